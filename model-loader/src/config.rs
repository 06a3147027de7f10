//! Model configuration: parsing and validating a Hugging Face `config.json`, writing one back,
//! and the list of tensors (with shapes) that a configuration implies.

use crate::error::LoadError;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Largest accepted `num_hidden_layers` (a guard against absurd configs, not a model limit).
const MAX_LAYERS: usize = 1 << 16;

/// A supported decoder architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Arch {
    /// `LlamaForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM` (q/k/v projection biases).
    Qwen2,
    /// `Qwen3ForCausalLM` (per-head q/k RMSNorm).
    Qwen3,
}

impl Arch {
    /// All supported architectures.
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3];

    /// The Hugging Face class name, as in `config.json`'s `architectures`.
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The Hugging Face `model_type` (`"llama"`, `"qwen2"`, `"qwen3"`).
    pub fn model_type(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// Looks up an architecture by Hugging Face class name (`"Qwen3ForCausalLM"`).
    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Looks up an architecture by `model_type` (`"qwen3"`), or by short name, case-insensitively.
    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.model_type().eq_ignore_ascii_case(model_type))
    }

    fn default_max_position_embeddings(&self) -> usize {
        match self {
            Arch::Llama => 2048,
            Arch::Qwen2 | Arch::Qwen3 => 32768,
        }
    }
}

/// What a tensor of the checkpoint is for (see [`ModelConfig::expected_tensor_table`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// `[vocab, hidden]` token embeddings (also the output head when tied).
    Embedding,
    /// `[hidden]` final RMSNorm weight.
    FinalNorm,
    /// `[vocab, hidden]` output head (untied models only).
    LmHead,
    /// A tensor of decoder layer `.0`.
    Layer(usize, LayerTensor),
}

/// A tensor inside one decoder layer: projection weights `[out, in]`, biases `[out]`,
/// norm weights `[width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    InputNorm,
    Q,
    QBias,
    K,
    KBias,
    V,
    VBias,
    O,
    OBias,
    QNorm,
    KNorm,
    PostNorm,
    Gate,
    Up,
    Down,
}

/// One tensor a config implies: its name in the checkpoint, its shape and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored (`[out, in]` for projections).
    pub shape: Vec<usize>,
    /// What it is for.
    pub role: TensorRole,
}

/// The hyper-parameters of a decoder-only transformer, as read from `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Model (residual stream) width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads` (query heads).
    pub num_heads: usize,
    /// `num_key_value_heads` (defaults to `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head dimension: `head_dim` if given, else `hidden_size / num_heads`.
    pub head_dim: usize,
    /// Rotary base: top-level `rope_theta` or `rope_parameters.rope_theta`; default 10000.
    pub rope_theta: f32,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: f32,
    /// Whether `lm_head` shares the embedding matrix (then `lm_head.weight` need not be stored).
    pub tie_word_embeddings: bool,
    /// q/k/v projection biases. Llama and Qwen3: config `attention_bias` (default false; when true
    /// `o_proj` has a bias too, as in Hugging Face); Qwen2: always true, never an `o_proj` bias.
    pub attention_bias: bool,
    /// Per-head RMSNorm of queries and keys over `head_dim` (`q_norm`/`k_norm`); Qwen3 only.
    pub qk_norm: bool,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// End-of-sequence ids (`eos_token_id` may be an int, a list, or null).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
}

/// Typed access to the fields of a config JSON object, producing errors that name the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

/// A short, single-line rendering of a JSON value for error messages.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        let cut: String = s.chars().take(37).collect();
        format!("{cut}...")
    } else {
        s
    }
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> LoadError {
        LoadError::ConfigField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    /// The field's value, treating JSON `null` as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_of(&self, field: &str, v: &Value) -> Result<usize, LoadError> {
        let n = v.as_u64().ok_or_else(|| {
            self.err(
                field,
                format!("must be a non-negative integer, got {}", show(v)),
            )
        })?;
        usize::try_from(n).map_err(|_| self.err(field, format!("is too large ({n})")))
    }

    fn usize_req(&self, field: &str) -> Result<usize, LoadError> {
        match self.get(field) {
            Some(v) => self.usize_of(field, v),
            None => Err(self.err(field, "is missing")),
        }
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, LoadError> {
        self.get(field).map(|v| self.usize_of(field, v)).transpose()
    }

    fn f32_of(&self, field: &str, v: &Value) -> Result<f32, LoadError> {
        let x = v
            .as_f64()
            .ok_or_else(|| self.err(field, format!("must be a number, got {}", show(v))))?;
        let x = x as f32;
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(self.err(
                field,
                format!("must be a positive finite number, got {}", show(v)),
            ))
        }
    }

    fn f32_opt(&self, field: &str) -> Result<Option<f32>, LoadError> {
        self.get(field).map(|v| self.f32_of(field, v)).transpose()
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>, LoadError> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(field, format!("must be a boolean, got {}", show(v))))
            })
            .transpose()
    }

    fn token_id(&self, field: &str, v: &Value) -> Result<u32, LoadError> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(field, format!("must be a token id (u32), got {}", show(v))))
    }

    /// `eos_token_id`: an int, a list of ints, or null/absent (no ids).
    fn token_ids(&self, field: &str) -> Result<Vec<u32>, LoadError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.token_id(field, v)).collect(),
            Some(v) => Ok(vec![self.token_id(field, v)?]),
        }
    }

    fn arch(&self) -> Result<Arch, LoadError> {
        let unsupported = |arch: String| LoadError::UnsupportedArch {
            path: self.path.to_path_buf(),
            arch,
        };
        match self.get("architectures") {
            None => {}
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut names = Vec::with_capacity(items.len());
                for item in items {
                    let name = item.as_str().ok_or_else(|| {
                        self.err(
                            "architectures",
                            format!("must be a list of strings, got {}", show(item)),
                        )
                    })?;
                    if let Some(arch) = Arch::from_name(name) {
                        return Ok(arch);
                    }
                    names.push(name);
                }
                return Err(unsupported(names.join(", ")));
            }
            Some(Value::Array(_)) => {}
            Some(v) => {
                return Err(self.err(
                    "architectures",
                    format!("must be a list of strings, got {}", show(v)),
                ))
            }
        }
        match self.get("model_type") {
            Some(Value::String(t)) => {
                Arch::from_model_type(t).ok_or_else(|| unsupported(t.clone()))
            }
            Some(v) => Err(self.err("model_type", format!("must be a string, got {}", show(v)))),
            None => Err(self.err("architectures", "is missing (and so is model_type)")),
        }
    }

    /// `rope_parameters.rope_theta` (newer layout) if present, else top-level `rope_theta`.
    fn rope_theta(&self) -> Result<Option<f32>, LoadError> {
        match self.get("rope_parameters") {
            Some(Value::Object(params)) => {
                if let Some(v) = params.get("rope_theta").filter(|v| !v.is_null()) {
                    return self.f32_of("rope_parameters.rope_theta", v).map(Some);
                }
            }
            Some(v) => {
                return Err(self.err(
                    "rope_parameters",
                    format!("must be an object, got {}", show(v)),
                ))
            }
            None => {}
        }
        self.f32_opt("rope_theta")
    }

    /// Rejects rotary scaling schemes (only plain RoPE is implemented).
    fn check_rope_type(&self) -> Result<(), LoadError> {
        for field in ["rope_parameters", "rope_scaling"] {
            let Some(v) = self.get(field) else { continue };
            let Some(params) = v.as_object() else {
                return Err(self.err(field, format!("must be an object, got {}", show(v))));
            };
            for key in ["rope_type", "type"] {
                match params.get(key).filter(|t| !t.is_null()) {
                    None => {}
                    Some(Value::String(t)) if t == "default" => {}
                    Some(t) => {
                        return Err(self.err(
                            &format!("{field}.{key}"),
                            format!("{} is not supported (only default RoPE)", show(t)),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Rejects flags that would change the math in ways the runtime does not implement.
    fn check_unsupported_flags(&self) -> Result<(), LoadError> {
        for field in ["mlp_bias", "use_sliding_window"] {
            if self.bool_opt(field)? == Some(true) {
                return Err(self.err(field, "= true is not supported"));
            }
        }
        match self.get("hidden_act") {
            None => {}
            Some(Value::String(act)) if act == "silu" || act == "swish" => {}
            Some(v) => {
                return Err(self.err(
                    "hidden_act",
                    format!("{} is not supported (only silu)", show(v)),
                ))
            }
        }
        self.check_rope_type()
    }
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<ModelConfig, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| LoadError::ConfigJson {
            path: path.to_path_buf(),
            msg: format!("not UTF-8: {e}"),
        })?;
        ModelConfig::from_json_str(text, path)
    }

    /// Parses and validates a config from JSON text; `origin` is the path named in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<ModelConfig, LoadError> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoadError::ConfigJson {
            path: origin.to_path_buf(),
            msg: e.to_string(),
        })?;
        let Value::Object(obj) = &value else {
            return Err(LoadError::ConfigJson {
                path: origin.to_path_buf(),
                msg: format!("expected a JSON object, got {}", show(&value)),
            });
        };
        let f = Fields { obj, path: origin };

        let arch = f.arch()?;
        f.check_unsupported_flags()?;
        let vocab_size = f.usize_req("vocab_size")?;
        let hidden_size = f.usize_req("hidden_size")?;
        let intermediate_size = f.usize_req("intermediate_size")?;
        let num_layers = f.usize_req("num_hidden_layers")?;
        let num_heads = f.usize_req("num_attention_heads")?;
        let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim_given = f.usize_opt("head_dim")?;

        let nonzero = [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_layers),
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
            ("head_dim", head_dim_given.unwrap_or(1)),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(f.err(field, "must be greater than 0"));
            }
        }
        let inconsistent = |msg: String| LoadError::InconsistentConfig {
            path: origin.to_path_buf(),
            msg,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(inconsistent(format!(
                "num_attention_heads ({num_heads}) is not divisible by num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match head_dim_given {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(inconsistent(format!(
                    "head_dim is absent and hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads})"
                )))
            }
        };
        if num_layers > MAX_LAYERS {
            return Err(inconsistent(format!(
                "num_hidden_layers ({num_layers}) exceeds {MAX_LAYERS}"
            )));
        }

        let attention_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama | Arch::Qwen3 => f.bool_opt("attention_bias")?.unwrap_or(false),
        };
        let config = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f.rope_theta()?.unwrap_or(10000.0),
            rms_norm_eps: f.f32_opt("rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: f
                .usize_opt("max_position_embeddings")?
                .unwrap_or(arch.default_max_position_embeddings()),
            eos_token_ids: f.token_ids("eos_token_id")?,
            bos_token_id: f
                .get("bos_token_id")
                .map(|v| f.token_id("bos_token_id", v))
                .transpose()?,
        };
        if config.checked_num_parameters().is_none() {
            return Err(inconsistent(
                "tensor sizes overflow a 64-bit parameter count".to_string(),
            ));
        }
        Ok(config)
    }

    /// A Hugging Face `config.json` for this configuration, which [`ModelConfig::from_json_str`]
    /// reads back identically (as long as `qk_norm` and, for Qwen2, `attention_bias` have the
    /// values the architecture implies).
    pub fn to_hf_json(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": [self.arch.name()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": f32_to_json(self.rope_theta),
            "rope_scaling": null,
            "rms_norm_eps": f32_to_json(self.rms_norm_eps),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": "bfloat16",
        });
        if let Value::Object(obj) = &mut v {
            match self.arch {
                Arch::Llama => {
                    obj.insert("attention_bias".into(), json!(self.attention_bias));
                    obj.insert("mlp_bias".into(), json!(false));
                }
                Arch::Qwen2 => {
                    obj.insert("use_sliding_window".into(), json!(false));
                    obj.insert("sliding_window".into(), Value::Null);
                    obj.insert("max_window_layers".into(), json!(self.num_layers));
                }
                Arch::Qwen3 => {
                    obj.insert("attention_bias".into(), json!(self.attention_bias));
                    obj.insert("use_sliding_window".into(), json!(false));
                    obj.insert("sliding_window".into(), Value::Null);
                    obj.insert("max_window_layers".into(), json!(self.num_layers));
                }
            }
        }
        v
    }

    /// Query width: `num_heads * head_dim` (the rows of `q_proj`).
    pub fn q_dim(&self) -> usize {
        self.num_heads.saturating_mul(self.head_dim)
    }

    /// Key/value width: `num_kv_heads * head_dim` (the rows of `k_proj` and `v_proj`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }

    /// Whether `q_proj`, `k_proj` and `v_proj` carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias
    }

    /// Whether `o_proj` carries a bias (Llama/Qwen3 with `attention_bias`; never Qwen2).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.arch != Arch::Qwen2
    }

    /// Every tensor the config implies, with its shape, in a stable order: the embedding, then
    /// each layer (input norm, q/k/v/o projections and biases, q/k norms, post-attention norm,
    /// gate/up/down), then the final norm, then `lm_head` unless embeddings are tied.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.expected_tensor_table()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect()
    }

    /// [`ModelConfig::expected_tensors`] with each tensor's [`TensorRole`]: the one place
    /// tensor names are spelled (the checkpoint's validation and both backends' weight
    /// tables read it).
    pub fn expected_tensor_table(&self) -> Vec<ExpectedTensor> {
        let h = self.hidden_size;
        let mut out = Vec::with_capacity(3 + self.num_layers.min(MAX_LAYERS) * 16);
        out.push(ExpectedTensor {
            name: "model.embed_tokens.weight".to_string(),
            shape: vec![self.vocab_size, h],
            role: TensorRole::Embedding,
        });
        for i in 0..self.num_layers.min(MAX_LAYERS) {
            out.extend(self.expected_layer_tensors(i));
        }
        out.push(ExpectedTensor {
            name: "model.norm.weight".to_string(),
            shape: vec![h],
            role: TensorRole::FinalNorm,
        });
        if !self.tie_word_embeddings {
            out.push(ExpectedTensor {
                name: "lm_head.weight".to_string(),
                shape: vec![self.vocab_size, h],
                role: TensorRole::LmHead,
            });
        }
        out
    }

    /// The tensors of decoder layer `layer`, in the order of [`ModelConfig::expected_tensors`].
    pub fn expected_layer_tensors(&self, layer: usize) -> Vec<ExpectedTensor> {
        use LayerTensor as T;
        let h = self.hidden_size;
        let (q, kv, inter) = (self.q_dim(), self.kv_dim(), self.intermediate_size);
        let p = format!("model.layers.{layer}");
        let mut out = Vec::with_capacity(16);
        let mut push = |suffix: &str, shape: Vec<usize>, t: LayerTensor| {
            out.push(ExpectedTensor {
                name: format!("{p}.{suffix}"),
                shape,
                role: TensorRole::Layer(layer, t),
            })
        };
        push("input_layernorm.weight", vec![h], T::InputNorm);
        push("self_attn.q_proj.weight", vec![q, h], T::Q);
        if self.qkv_bias() {
            push("self_attn.q_proj.bias", vec![q], T::QBias);
        }
        push("self_attn.k_proj.weight", vec![kv, h], T::K);
        if self.qkv_bias() {
            push("self_attn.k_proj.bias", vec![kv], T::KBias);
        }
        push("self_attn.v_proj.weight", vec![kv, h], T::V);
        if self.qkv_bias() {
            push("self_attn.v_proj.bias", vec![kv], T::VBias);
        }
        push("self_attn.o_proj.weight", vec![h, q], T::O);
        if self.o_bias() {
            push("self_attn.o_proj.bias", vec![h], T::OBias);
        }
        if self.qk_norm {
            push("self_attn.q_norm.weight", vec![self.head_dim], T::QNorm);
            push("self_attn.k_norm.weight", vec![self.head_dim], T::KNorm);
        }
        push("post_attention_layernorm.weight", vec![h], T::PostNorm);
        push("mlp.gate_proj.weight", vec![inter, h], T::Gate);
        push("mlp.up_proj.weight", vec![inter, h], T::Up);
        push("mlp.down_proj.weight", vec![h, inter], T::Down);
        out
    }

    /// Total number of parameters (embedding and, when untied, `lm_head` included).
    /// Saturates at `u64::MAX` for absurd hand-built configs.
    pub fn num_parameters(&self) -> u64 {
        self.checked_num_parameters().unwrap_or(u64::MAX)
    }

    /// The parameter count with every product and sum checked (`None` on overflow).
    fn checked_num_parameters(&self) -> Option<u64> {
        let n = |x: usize| u64::try_from(x).ok();
        let (h, v, inter, d) = (
            n(self.hidden_size)?,
            n(self.vocab_size)?,
            n(self.intermediate_size)?,
            n(self.head_dim)?,
        );
        let q = n(self.num_heads)?.checked_mul(d)?;
        let kv = n(self.num_kv_heads)?.checked_mul(d)?;
        // Shapes must also fit usize (they are built with saturating products).
        usize::try_from(q).ok()?;
        usize::try_from(kv).ok()?;
        let mut layer = h.checked_mul(2)?; // the two RMSNorms
        layer = layer.checked_add(q.checked_mul(h)?.checked_mul(2)?)?; // q_proj, o_proj
        layer = layer.checked_add(kv.checked_mul(h)?.checked_mul(2)?)?; // k_proj, v_proj
        layer = layer.checked_add(inter.checked_mul(h)?.checked_mul(3)?)?; // gate, up, down
        if self.qkv_bias() {
            layer = layer.checked_add(q.checked_add(kv.checked_mul(2)?)?)?;
        }
        if self.o_bias() {
            layer = layer.checked_add(h)?;
        }
        if self.qk_norm {
            layer = layer.checked_add(d.checked_mul(2)?)?;
        }
        let embed = v.checked_mul(h)?;
        let heads = if self.tie_word_embeddings { 0 } else { embed };
        layer
            .checked_mul(n(self.num_layers)?)?
            .checked_add(embed)?
            .checked_add(h)?
            .checked_add(heads)
    }
}

/// An f32 as the JSON number with the shortest decimal form that reads back to the same f32
/// (so `1e-6f32` is written as `1e-6`, not `9.999999974752427e-7`).
fn f32_to_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig, LoadError> {
        ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
    }

    fn base() -> Value {
        json!({
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "tie_word_embeddings": true, "eos_token_id": [1, 2], "bos_token_id": null
        })
    }

    #[test]
    fn parses_and_round_trips() {
        let c = parse(base()).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert!(c.qk_norm && !c.attention_bias);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.bos_token_id, None);
        let again = parse(c.to_hf_json()).unwrap();
        assert_eq!(again, c);
        let text = c.to_hf_json().to_string();
        assert!(text.contains("\"rms_norm_eps\":1e-6"), "{text}");
    }

    #[test]
    fn model_type_fallback_and_defaults() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("architectures");
        v["model_type"] = json!("qwen2");
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        v.as_object_mut().unwrap().remove("head_dim");
        v.as_object_mut().unwrap().remove("rope_theta");
        v["eos_token_id"] = json!(7);
        let c = parse(v).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.attention_bias && !c.qk_norm && !c.o_bias());
        assert_eq!((c.num_kv_heads, c.head_dim), (4, 8));
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.eos_token_ids, vec![7]);
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases = [
            ("vocab_size", json!(0)),
            ("hidden_size", json!(-3)),
            ("num_attention_heads", json!("four")),
            ("tie_word_embeddings", json!(1)),
            ("eos_token_id", json!([1, "x"])),
            ("rms_norm_eps", json!(0.0)),
            ("mlp_bias", json!(true)),
            ("hidden_act", json!("gelu")),
        ];
        for (field, value) in cases {
            let mut v = base();
            v[field] = value;
            match parse(v) {
                Err(LoadError::ConfigField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        assert!(
            matches!(parse(v), Err(LoadError::ConfigField { field, .. }) if field == "rope_scaling.rope_type")
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let mut v = base();
        v["vocab_size"] = json!(u64::MAX);
        assert!(matches!(
            parse(v),
            Err(LoadError::InconsistentConfig { .. })
        ));
        let mut v = base();
        v["num_hidden_layers"] = json!(1u64 << 40);
        assert!(matches!(
            parse(v),
            Err(LoadError::InconsistentConfig { .. })
        ));
        assert!(matches!(
            ModelConfig::from_json_str("[1]", Path::new("c")),
            Err(LoadError::ConfigJson { .. })
        ));
    }
}
