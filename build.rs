//! Build script: compiles spindle's CUDA kernels (kernels/*.cu) with nvcc into a static
//! library linked with the static CUDA runtime, generates Rust FFI for
//! kernels/spindle_kernels.h with bindgen, and reports per-kernel registers / spills for
//! sm_90 from ptxas. With the `cuda` feature off it does nothing, so `cargo build` and
//! `cargo test` work on machines with no CUDA toolkit. Toolchain: scripts/setup-cuda,
//! docs/gpu.md.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::run();
}

/// Everything CUDA: compiled only with the `cuda` feature, like its build dependencies
/// (cc, bindgen), so a default build compiles neither.
#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Every kernel source, compiled in this order.
    const KERNELS: &[&str] = &[
        "kernels/paged_decode.cu",
        "kernels/prefill_attention.cu",
        "kernels/forked_attention.cu",
        "kernels/kv_write.cu",
        "kernels/elementwise.cu",
        "kernels/sampling.cu",
    ];
    /// Every header the kernels include; bindgen reads the first one only.
    const HEADERS: &[&str] = &["kernels/spindle_kernels.h", "kernels/attention_common.cuh"];

    /// SASS for A100 (sm_80) and H100/H200 (sm_90), plus compute_90 PTX for later GPUs.
    const GENCODE: &[&str] = &[
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ];

    pub fn run() {
        for v in [
            "NVCC",
            "CUDA_HOME",
            "CUDA_PATH",
            "SPINDLE_PTXAS_VERBOSE",
            "LIBCLANG_PATH",
        ] {
            println!("cargo:rerun-if-env-changed={v}");
        }
        for f in KERNELS.iter().chain(HEADERS) {
            println!("cargo:rerun-if-changed={f}");
        }

        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
        let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
            panic!(
                "feature `cuda` is on but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin/nvcc, \
                 .venv-cuda and PATH). Run `scripts/setup-cuda` and then `. .venv-cuda/env.sh`, \
                 or set NVCC=/path/to/nvcc (CUDA 13.0)."
            )
        });
        let toolkit = nvcc.parent().and_then(Path::parent).unwrap().to_path_buf();
        println!("cargo:rerun-if-changed={}", nvcc.display());

        // 1. Kernels -> libspindle_kernels.a, cudart static. Each .cu is compiled on its own
        // (whole-program mode): cc adds `--device-c` (relocatable device code) when one build
        // holds several .cu files, and after the device link such a binary keeps only the
        // linked sm_80/sm_90 SASS, not the compute_90 PTX a newer GPU would JIT. The kernels
        // call nothing across files, so separate whole-program objects lose nothing, and
        // their fatbinaries keep SASS for sm_80 and sm_90 plus the compute_90 PTX.
        // cc recognises nvcc (and wraps host flags in -Xcompiler) only when it finds it itself,
        // through $NVCC; an explicit .compiler() would be treated as a host compiler.
        if env::var_os("NVCC").is_none() {
            env::set_var("NVCC", &nvcc);
        }
        let mut objects = Vec::new();
        for k in KERNELS {
            let mut build = cc::Build::new();
            build
                .cuda(true)
                // -G (device debug, from the dev profile's debug=true) disables device optimisation.
                .debug(false)
                .opt_level(3)
                .include(manifest.join("kernels"))
                .flag("-lineinfo")
                .flag("-std=c++17")
                .flag("--expt-relaxed-constexpr")
                .flag("-Xcompiler=-fPIC");
            for g in GENCODE {
                build.flag(g);
            }
            build.file(manifest.join(k));
            objects.extend(build.compile_intermediates());
        }
        // Archive the objects (no .cu file in this build, so no device-link step).
        cc::Build::new()
            .objects(&objects)
            .compile("spindle_kernels");
        println!("cargo:rustc-link-lib=cudart_static");

        // cc's cudart search path assumes <toolkit>/targets/x86_64-linux/lib; the PyPI wheels
        // put libcudart_static.a in <toolkit>/lib (no lib64).
        for d in ["lib", "lib64", "targets/x86_64-linux/lib"] {
            let p = toolkit.join(d);
            if p.join("libcudart_static.a").exists() {
                println!("cargo:rustc-link-search=native={}", p.display());
            }
        }
        for lib in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib={lib}");
        }

        // 2. FFI bindings for the one header.
        let header = manifest.join(HEADERS[0]);
        let bindings = bindgen::Builder::default()
            .header(header.to_string_lossy())
            .allowlist_function("spindle_.*")
            .allowlist_type("Spindle.*")
            .allowlist_var("SPINDLE_.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .generate()
            .expect("bindgen failed on kernels/spindle_kernels.h (is libclang installed? scripts/setup-cuda)");
        bindings
            .write_to_file(out_dir.join("kernels_ffi.rs"))
            .expect("write kernels_ffi.rs");

        // 3. Registers / spills per kernel for sm_90.
        ptxas_report(&nvcc, &manifest, &out_dir);
    }

    fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
        let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
        if let Some(p) = env::var_os("NVCC") {
            return exe(PathBuf::from(p));
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(h) = env::var_os(var) {
                if let Some(p) = exe(PathBuf::from(h).join("bin/nvcc")) {
                    return Some(p);
                }
            }
        }
        // scripts/setup-cuda's venv: .venv-cuda/lib/python3.X/site-packages/nvidia/cu13/bin/nvcc
        if let Ok(rd) = std::fs::read_dir(manifest.join(".venv-cuda/lib")) {
            for e in rd.flatten() {
                if let Some(p) = exe(e.path().join("site-packages/nvidia/cu13/bin/nvcc")) {
                    return Some(p);
                }
            }
        }
        env::var_os("PATH")
            .and_then(|path| env::split_paths(&path).find_map(|d| exe(d.join("nvcc"))))
    }

    struct KernelInfo {
        file: String,
        name: String,
        regs: u32,
        spill_st: u32,
        spill_ld: u32,
        stack: u32,
        smem: u32,
    }

    /// Runs `nvcc -cubin -arch=sm_90 --ptxas-options=-v` per file, writes the table to
    /// OUT_DIR/ptxas_sm90.txt and prints a summary as cargo warnings (every kernel with
    /// SPINDLE_PTXAS_VERBOSE=1, otherwise only kernels that spill plus one summary line).
    fn ptxas_report(nvcc: &Path, manifest: &Path, out_dir: &Path) {
        let mut rows: Vec<KernelInfo> = Vec::new();
        for k in KERNELS {
            let cubin = out_dir.join(Path::new(k).with_extension("cubin").file_name().unwrap());
            let out = Command::new(nvcc)
                .args([
                    "-cubin",
                    "-arch=sm_90",
                    "-O3",
                    "-std=c++17",
                    "--expt-relaxed-constexpr",
                ])
                .arg("--ptxas-options=-v")
                .arg("-I")
                .arg(manifest.join("kernels"))
                .arg("-o")
                .arg(&cubin)
                .arg(manifest.join(k))
                .output();
            let out = match out {
                Ok(o) if o.status.success() => o,
                Ok(o) => {
                    println!("cargo:warning=ptxas report for {k} failed: {}", o.status);
                    continue;
                }
                Err(e) => {
                    println!("cargo:warning=ptxas report for {k} failed: {e}");
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&out.stderr);
            parse_ptxas(k, &text, &mut rows);
        }
        let mut table =
            String::from("file | kernel | regs | spill st B | spill ld B | stack B | smem B\n");
        for r in &rows {
            table.push_str(&format!(
                "{} | {} | {} | {} | {} | {} | {}\n",
                r.file, r.name, r.regs, r.spill_st, r.spill_ld, r.stack, r.smem
            ));
        }
        let _ = std::fs::write(out_dir.join("ptxas_sm90.txt"), &table);
        let verbose = env::var_os("SPINDLE_PTXAS_VERBOSE").is_some_and(|v| v != "0");
        for r in &rows {
            if verbose || r.spill_st + r.spill_ld > 0 {
                println!(
                    "cargo:warning=ptxas sm_90 {}: {} regs, spill {}/{} B st/ld, stack {} B, smem {} B ({})",
                    r.name, r.regs, r.spill_st, r.spill_ld, r.stack, r.smem, r.file
                );
            }
        }
        let spilling = rows.iter().filter(|r| r.spill_st + r.spill_ld > 0).count();
        let max_regs = rows.iter().map(|r| r.regs).max().unwrap_or(0);
        println!(
            "cargo:warning=ptxas sm_90: {} kernels, max {} regs, {} with spills; table: {}",
            rows.len(),
            max_regs,
            spilling,
            out_dir.join("ptxas_sm90.txt").display()
        );
    }

    /// Parses ptxas -v output: "Compiling entry function '<mangled>' for 'sm_90'", then
    /// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then
    /// "Used N registers, ... N bytes smem".
    fn parse_ptxas(file: &str, text: &str, rows: &mut Vec<KernelInfo>) {
        let num_before = |line: &str, key: &str| -> u32 {
            line.find(key)
                .and_then(|i| line[..i].split_whitespace().last())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let file = Path::new(file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for line in text.lines() {
            if let Some(i) = line.find("Compiling entry function '") {
                let rest = &line[i + "Compiling entry function '".len()..];
                let mangled = rest.split('\'').next().unwrap_or("");
                rows.push(KernelInfo {
                    file: file.clone(),
                    name: short_name(mangled),
                    regs: 0,
                    spill_st: 0,
                    spill_ld: 0,
                    stack: 0,
                    smem: 0,
                });
            } else if let Some(r) = rows.last_mut() {
                if line.contains("bytes spill stores") {
                    r.stack = num_before(line, "bytes stack frame");
                    r.spill_st = num_before(line, "bytes spill stores");
                    r.spill_ld = num_before(line, "bytes spill loads");
                } else if line.contains("Used") && line.contains("registers") {
                    r.regs = num_before(line, "registers");
                    r.smem = num_before(line, "bytes smem");
                }
            }
        }
    }

    /// `_ZN7spindle19paged_decode_kernelILi128ELi8EEEv...` -> `paged_decode_kernel<128,8>`.
    fn short_name(mangled: &str) -> String {
        let Some(rest) = mangled.strip_prefix("_ZN7spindle") else {
            return mangled.to_string();
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(n) = digits.parse::<usize>() else {
            return mangled.to_string();
        };
        let body = &rest[digits.len()..];
        let name = &body[..n.min(body.len())];
        let tail = &body[n.min(body.len())..];
        let mut args = Vec::new();
        if let Some(t) = tail.strip_prefix('I') {
            // Template arguments: Li<int>E, Lb<0|1>E, or a type (kept as its mangled code).
            let mut s = t;
            while !s.is_empty() && !s.starts_with('E') {
                if let Some(r) = s.strip_prefix("Li").or_else(|| s.strip_prefix("Lb")) {
                    let v: String = r.chars().take_while(|c| *c != 'E').collect();
                    args.push(v.clone());
                    s = &r[(v.len() + 1).min(r.len())..];
                } else if let Some(r) = s.strip_prefix("13__nv_bfloat16") {
                    args.push("bf16".into());
                    s = r;
                } else {
                    let c = &s[..1];
                    args.push(if c == "f" { "f32".into() } else { c.into() });
                    s = &s[1..];
                }
            }
        }
        if args.is_empty() {
            name.to_string()
        } else {
            format!("{name}<{}>", args.join(","))
        }
    }
}
