//! ggml tensor types (the element encodings of GGUF files) and their dequantisation to f32:
//! F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K, following ggml's reference
//! `dequantize_row_*` routines block by block.

use half::{bf16, f16};
use std::fmt;

/// A ggml tensor type this loader can dequantise (named as ggml names them).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE binary32 (ggml type 0).
    F32,
    /// IEEE binary16 (ggml type 1).
    F16,
    /// 32 values: f16 scale `d`, 16 bytes of 4-bit codes; `x = (q - 8) * d` (type 2).
    Q4_0,
    /// 32 values: f16 `d`, f16 `m`, 16 bytes of 4-bit codes; `x = q * d + m` (type 3).
    Q4_1,
    /// 32 values: f16 `d`, 32 signed bytes; `x = q * d` (type 8).
    Q8_0,
    /// 256-value super-block of eight 32-value sub-blocks with 6-bit scales and mins (type 12).
    Q4_K,
    /// 256-value super-block: 4 low bits + 2 high bits per value, 16 int8 scales (type 14).
    Q6_K,
    /// bfloat16 (ggml type 30).
    BF16,
}

/// Values per Q4_K / Q6_K super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The type for a ggml type id, or `None` for one this loader does not read.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's name of the type (`"Q4_1"`).
    pub fn name(&self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Values per block (1 for the plain float types).
    pub fn block_len(&self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4_K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes holding `n` values, or `None` when `n` is not a whole number of blocks (or overflows).
    pub fn bytes_for(&self, n: u64) -> Option<u64> {
        let len = self.block_len() as u64;
        if !n.is_multiple_of(len) {
            return None;
        }
        (n / len).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The `j`-th 6-bit (scale, min) pair of a Q4_K block's 12 packed scale bytes
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantises one block (`ty.block_bytes()` bytes) into `out` (`ty.block_len()` values).
fn block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for (j, &q) in qs.iter().enumerate() {
                out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for (j, &q) in qs.iter().enumerate() {
                out[j] = (q & 0x0F) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
        GgmlType::Q4_K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..16 + QK_K / 2];
            // Four 64-value groups; each uses 32 code bytes (low nibbles, then high nibbles)
            // and two (scale, min) pairs.
            for g in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * g, scales);
                let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * g..32 * g + 32];
                let y = &mut out[64 * g..64 * g + 64];
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q6_K => {
            let ql_all = &b[..QK_K / 2];
            let qh_all = &b[QK_K / 2..QK_K / 2 + QK_K / 4];
            let sc_all = &b[QK_K / 2 + QK_K / 4..QK_K / 2 + QK_K / 4 + QK_K / 16];
            let d = f16_at(b, QK_K / 2 + QK_K / 4 + QK_K / 16);
            // Two 128-value halves, each with 64 low-bit bytes, 32 high-bit bytes, 8 scales.
            for h in 0..2 {
                let ql = &ql_all[64 * h..64 * h + 64];
                let qh = &qh_all[32 * h..32 * h + 32];
                let sc = &sc_all[8 * h..8 * h + 8];
                let y = &mut out[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantises `data` holding values of type `ty` to f32, in storage order.
///
/// Returns `None` when `data` is not a whole number of blocks. The callers check the byte
/// length against the tensor's shape first, so `data.len() / block_bytes * block_len` values
/// come back.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let bb = ty.block_bytes();
    let bl = ty.block_len();
    if !data.len().is_multiple_of(bb) {
        return None;
    }
    let nblocks = data.len() / bb;
    // [nblocks * block_len] values
    let mut out = vec![0f32; nblocks * bl];
    for (b, o) in data.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        block(ty, b, o);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn ids_sizes_and_names() {
        for (id, name, len, bytes) in [
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (3, "Q4_1", 32, 20),
            (8, "Q8_0", 32, 34),
            (12, "Q4_K", 256, 144),
            (14, "Q6_K", 256, 210),
            (30, "BF16", 1, 2),
        ] {
            let t = GgmlType::from_id(id).expect("known id");
            assert_eq!(
                (t.name(), t.block_len(), t.block_bytes()),
                (name, len, bytes)
            );
        }
        for unknown in [6, 7, 10, 11, 13, 15, 16, 29, 31, 999] {
            assert_eq!(GgmlType::from_id(unknown), None, "id {unknown}");
        }
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(dequantize(GgmlType::Q8_0, &[0u8; 33]), None);
    }

    #[test]
    fn plain_floats() {
        let mut b = Vec::new();
        b.extend_from_slice(&1.5f32.to_le_bytes());
        b.extend_from_slice(&(-0.25f32).to_le_bytes());
        assert_eq!(dequantize(GgmlType::F32, &b).unwrap(), vec![1.5, -0.25]);
        // f16 0x3C00 = 1.0, 0xC100 = -2.5
        assert_eq!(
            dequantize(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC1]).unwrap(),
            vec![1.0, -2.5]
        );
        // bf16 0x3FC0 = 1.5, 0xC040 = -3.0
        assert_eq!(
            dequantize(GgmlType::BF16, &[0xC0, 0x3F, 0x40, 0xC0]).unwrap(),
            vec![1.5, -3.0]
        );
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        let codes: Vec<i8> = (0..32).map(|i| (i as i8) * 4 - 64).collect();
        b.extend(codes.iter().map(|&c| c as u8));
        let y = dequantize(GgmlType::Q8_0, &b).unwrap();
        // x = q * 0.5: q0 = -64 -> -32, q1 = -60 -> -30, q16 = 0 -> 0, q31 = 60 -> 30.
        assert_eq!(y.len(), 32);
        assert_eq!((y[0], y[1], y[16], y[31]), (-32.0, -30.0, 0.0, 30.0));
    }

    #[test]
    fn q4_0_block() {
        let mut b = h(2.0).to_vec();
        // byte j: low nibble j (value j), high nibble 15 - j (value 16 + j).
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b).unwrap();
        // low nibble 0 -> (0-8)*2 = -16; low 15 -> 14; high nibble of byte 0 is 15 -> 14;
        // high of byte 15 is 0 -> -16.
        assert_eq!((y[0], y[15], y[16], y[31]), (-16.0, 14.0, 14.0, -16.0));
        assert_eq!(y[3], -10.0); // (3 - 8) * 2
        assert_eq!(y[19], 8.0); // byte 3 high nibble 12: (12 - 8) * 2
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(0.25).to_vec();
        b.extend_from_slice(&h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_1, &b).unwrap();
        // x = q * 0.25 - 1
        assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 2.75, 2.75, -1.0));
        assert_eq!((y[5], y[21]), (0.25, 1.5)); // 5*0.25-1; byte 5 high = 10: 10*0.25-1
    }

    #[test]
    fn q4_k_block() {
        let mut b = h(0.5).to_vec(); // d
        b.extend_from_slice(&h(0.25)); // dmin
                                       // Scales/mins: sub-blocks 0..3 in the low 6 bits of bytes 0..3 / 4..7; sub-blocks 4..7
                                       // from the low/high nibbles of bytes 8..11 plus the top 2 bits of bytes 0..3 / 4..7.
                                       // Sub-block 0: scale 3, min 2. Sub-block 1: scale 63 (0x3F), min 1.
                                       // Sub-block 4: byte 8 = 0x5A -> scale low 0xA, min low 0x5; byte 0 top bits 0b01 -> scale
                                       // = 0xA | 1<<4 = 26; byte 4 top bits 0b10 -> min = 0x5 | 2<<4 = 37.
        let mut scales = [0u8; 12];
        scales[0] = 3 | (1 << 6);
        scales[1] = 63;
        scales[4] = 2 | (2 << 6);
        scales[5] = 1;
        scales[8] = 0x5A;
        b.extend_from_slice(&scales);
        // Codes: byte i of group 0 = low nibble 7, high nibble 15; group 2 (bytes 64..96) low 9.
        let mut qs = [0u8; 128];
        qs[..32].fill(0xF7);
        qs[64..96].fill(0x09);
        b.extend_from_slice(&qs);
        assert_eq!(b.len(), 144);
        let y = dequantize(GgmlType::Q4_K, &b).unwrap();
        assert_eq!(y.len(), 256);
        // value 0..32: sub-block 0: 0.5*3*7 - 0.25*2 = 10.0
        assert_eq!(y[0], 10.0);
        assert_eq!(y[31], 10.0);
        // value 32..64: sub-block 1 (high nibbles of group 0): 0.5*63*15 - 0.25*1 = 472.25
        assert_eq!(y[32], 472.25);
        // value 64..128: sub-blocks 2, 3: scale 0, min 0 -> 0
        assert_eq!(y[64], 0.0);
        // value 128..160: sub-block 4, low nibble 9: 0.5*26*9 - 0.25*37 = 117 - 9.25 = 107.75
        assert_eq!(y[128], 107.75);
        // value 160..192: sub-block 5 (high nibble 0, scale from byte 9 = 0, min 0) -> 0
        assert_eq!(y[160], 0.0);
    }

    #[test]
    fn q6_k_block() {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let mut sc = [0i8; 16];
        // Value 0: ql[0] low nibble 5, qh[0] bits 0..2 = 2 -> q = 5 | 2<<4 = 37, minus 32 = 5.
        // Value 32: ql[32] low nibble 0, qh[0] bits 2..4 = 0 -> -32.
        // Value 64: ql[0] high nibble 0xF, qh[0] bits 4..6 = 3 -> 15 | 48 = 63 - 32 = 31.
        // Value 96: ql[32] high nibble 1, qh[0] bits 6..8 = 1 -> 1 | 16 = 17 - 32 = -15.
        ql[0] = 0xF5;
        ql[32] = 0x10;
        qh[0] = 2 | (3 << 4) | (1 << 6);
        // Value 128 (second half): ql[64] low 1, qh[32] low bits 0 -> 1 - 32 = -31.
        ql[64] = 0x01;
        // Scales: value l uses sc[l/16 + {0,2,4,6}] within each half (8 per half).
        sc[0] = 2; // values 0..16
        sc[2] = -3; // values 32..48
        sc[4] = 4; // values 64..80
        sc[6] = 1; // values 96..112
        sc[8] = -1; // values 128..144
        let mut b = Vec::new();
        b.extend_from_slice(&ql);
        b.extend_from_slice(&qh);
        b.extend(sc.iter().map(|&s| s as u8));
        b.extend_from_slice(&h(0.5));
        assert_eq!(b.len(), 210);
        let y = dequantize(GgmlType::Q6_K, &b).unwrap();
        assert_eq!(y[0], 0.5 * 2.0 * 5.0);
        assert_eq!(y[32], 0.5 * -3.0 * -32.0);
        assert_eq!(y[64], 0.5 * 4.0 * 31.0);
        assert_eq!(y[96], 0.5 * 1.0 * -15.0);
        assert_eq!(y[128], 15.5); // 0.5 * -1 * -31
                                  // Value 1: ql[1] = 0, qh[1] = 0 -> -32, scale sc[0] = 2 -> -32.
        assert_eq!(y[1], -32.0);
        // Value 16 uses sc[1] = 0.
        assert_eq!(y[16], 0.0);
    }
}
