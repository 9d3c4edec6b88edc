use super::*;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module};

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0];

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1), never zero.
    fn unit(&mut self) -> f32 {
        loop {
            let v = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if v != 0.0 {
                return v;
            }
        }
    }

    /// Values whose magnitude also varies from block to block, as activations do.
    fn vec(&mut self, len: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(len);
        for block in 0..len.div_ceil(QK) {
            let scale = 0.05 + 4.0 * self.unit().abs() + (block % 3) as f32;
            for _ in 0..QK.min(len - block * QK) {
                out.push(self.unit() * scale);
            }
        }
        out
    }
}

fn ggml_dtype(format: QuantFormat) -> GgmlDType {
    match format {
        QuantFormat::Q4_0 => GgmlDType::Q4_0,
        QuantFormat::Q4_1 => GgmlDType::Q4_1,
        QuantFormat::Q8_0 => GgmlDType::Q8_0,
    }
}

/// A random `[n, k]` weight quantized by candle, and our matrix of the same bytes.
fn weights(format: QuantFormat, n: usize, k: usize, seed: u64) -> (QTensor, QuantMatrix) {
    let w = Rng::new(seed).vec(n * k);
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let qt = QTensor::quantize(&w, ggml_dtype(format)).unwrap();
    let qm = QuantMatrix::from_qtensor(&qt).unwrap().unwrap();
    assert_eq!((qm.format(), qm.n(), qm.k()), (format, n, k));
    (qt, qm)
}

fn matmul(w: &QuantMatrix, level: Level, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.n()];
    w.matmul_with(level, x, m, &mut out).unwrap();
    out
}

/// ggml's reference `quantize_row_q8_1`, written out independently: per block the quants,
/// `d` and `s` as f16.
fn ggml_quantize_q8_1(x: &[f32]) -> Vec<([i8; QK], f16, f16)> {
    x.chunks_exact(QK)
        .map(|xs| {
            let amax = xs
                .iter()
                .fold(0f32, |a, v| if v.abs() > a { v.abs() } else { a });
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            (qs, f16::from_f32(d), f16::from_f32(sum as f32 * d))
        })
        .collect()
}

/// `Σ|w||x|` per output: the scale the tolerances are relative to.
fn magnitudes(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (xr, wr) = (&x[i * k..][..k], &w[j * k..][..k]);
            mag[i * n + j] = xr
                .iter()
                .zip(wr)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
        }
    }
    mag
}

fn assert_close(got: &[f32], want: &[f64], mag: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(mag).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= rel * s.max(1e-6),
            "{what}: element {i}: got {g}, want {w} (scale {s})"
        );
    }
}

#[test]
fn quantizer_matches_ggml_reference() {
    let mut x = Rng::new(1).vec(8 * QK);
    // A block with d == 1 where x * id lands exactly on halves: roundf goes away from zero.
    for (j, v) in [127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5]
        .iter()
        .enumerate()
    {
        x[3 * QK + j] = *v;
    }
    x[3 * QK + 8..4 * QK].iter_mut().for_each(|v| *v = 0.25);
    // An all-zero block: d = 0 and the inverse scale is 0, not infinity.
    x[5 * QK..6 * QK].iter_mut().for_each(|v| *v = 0.0);
    assert_eq!(
        ggml_quantize_q8_1(&x)[3].0[..8],
        [127, 3, -4, 1, -1, 2, -2, 127]
    );
    // 2 rows of 4 blocks; 24 rows of 11 blocks (a partial group of 8), quantized in parallel.
    let x2 = Rng::new(2).vec(24 * 352);
    for (x, m, parallel) in [(&x, 2, false), (&x2, 24, true)] {
        let want = ggml_quantize_q8_1(x);
        for level in Level::available() {
            let mut aq = ActQuant::default();
            quantize_activations(level, x, m, x.len() / m, &mut aq, parallel);
            assert_eq!(aq.d.len(), want.len());
            for (b, (qs, d, s)) in want.iter().enumerate() {
                assert_eq!(&aq.qs[b * QK..][..QK], qs, "{level:?} block {b}");
                assert_eq!(
                    aq.d[b].to_bits(),
                    d.to_f32().to_bits(),
                    "{level:?} block {b}"
                );
                assert_eq!(
                    aq.s[b].to_bits(),
                    s.to_f32().to_bits(),
                    "{level:?} block {b}"
                );
                assert_eq!(aq.sum[b], qs.iter().map(|&q| q as i32).sum::<i32>());
            }
        }
    }
}

#[test]
fn matmul_matches_f64_reference() {
    let (m, n, k) = (5, 40, 192);
    let x = Rng::new(2).vec(m * k);
    for format in FORMATS {
        let (qt, w) = weights(format, n, k, 3);
        let wd = w.dequantize();
        let raw = qt.data().unwrap();
        let mut want = vec![0f64; m * n];
        let mut xhat = vec![0f32; m * k];
        for i in 0..m {
            let blocks = ggml_quantize_q8_1(&x[i * k..][..k]);
            for (b, (qs, d, s)) in blocks.iter().enumerate() {
                for (t, &q) in qs.iter().enumerate() {
                    xhat[i * k + b * QK + t] = q as f32 * d.to_f32();
                }
                if format == QuantFormat::Q4_1 {
                    // ggml takes the block's activation sum from the f16 `s`, not from d * Σq.
                    let exact = d.to_f64() * qs.iter().map(|&q| q as f64).sum::<f64>();
                    for j in 0..n {
                        let at = (j * (k / QK) + b) * 20;
                        let m_w = f16::from_le_bytes([raw[at + 2], raw[at + 3]]).to_f64();
                        want[i * n + j] += m_w * (s.to_f64() - exact);
                    }
                }
            }
            for j in 0..n {
                let dot = (0..k).map(|t| wd[j * k + t] as f64 * xhat[i * k + t] as f64);
                want[i * n + j] += dot.sum::<f64>();
            }
        }
        let mag = magnitudes(&wd, &xhat, m, n, k);
        for level in Level::available() {
            let got = matmul(&w, level, &x, m);
            assert_close(&got, &want, &mag, 1e-4, &format!("{format:?} {level:?}"));
        }
    }
}

#[test]
fn matmul_matches_candle_qmatmul() {
    // n = 40 keeps candle on its ggml-style kernels: for n % 16 == 0 and k % 256 == 0 it runs
    // Q8_0 weights against Q8K activations (one scale per 256 values), which is further from
    // llama.cpp's numerics than the tolerance here.
    for (m, n, k) in [(1, 40, 256), (7, 40, 128)] {
        let x = Rng::new(4).vec(m * k);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        for format in FORMATS {
            let (qt, w) = weights(format, n, k, 5);
            let mag = magnitudes(&w.dequantize(), &x, m, n, k);
            let candle = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap();
            let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let candle = candle.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let mut got = vec![0f32; m * n];
            w.matmul(&x, m, &mut got).unwrap();
            assert_close(&got, &candle, &mag, 1e-3, &format!("{format:?} vs candle"));
        }
    }
}

#[test]
fn batch_invariance() {
    let (n, k) = (40, 160);
    let targets: Vec<Vec<f32>> = (0..4).map(|t| Rng::new(100 + t).vec(k)).collect();
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let pool3 = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for format in FORMATS {
        let (_, w) = weights(format, n, k, 6);
        for level in Level::available() {
            let alone: Vec<Vec<f32>> = targets.iter().map(|t| matmul(&w, level, t, 1)).collect();
            let mut rng = Rng::new(7);
            for m in [1, 3, 17, 64] {
                for (t, target) in targets.iter().enumerate() {
                    let pos = (t * 13 + 5) % m;
                    let mut x = rng.vec(m * k);
                    x[pos * k..(pos + 1) * k].copy_from_slice(target);
                    let runs = [
                        matmul(&w, level, &x, m),
                        pool1.install(|| matmul(&w, level, &x, m)),
                        pool3.install(|| matmul(&w, level, &x, m)),
                    ];
                    for out in &runs {
                        let got = &out[pos * n..(pos + 1) * n];
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(got), bits(&alone[t]), "{format:?} {level:?} m={m}");
                    }
                }
            }
        }
    }
}

#[test]
fn simd_and_scalar_agree_bit_for_bit() {
    // 15 rows: every row-block size (8, 4, 2, 1); 50 outputs: a partial last tile.
    let (m, n, k) = (15, 50, 224);
    let x = Rng::new(8).vec(m * k);
    for format in FORMATS {
        let (_, w) = weights(format, n, k, 9);
        let scalar = matmul(&w, Level::Scalar, &x, m);
        let mag = magnitudes(&w.dequantize(), &x, m, n, k);
        let scalar64: Vec<f64> = scalar.iter().map(|&v| v as f64).collect();
        for level in Level::available() {
            let got = matmul(&w, level, &x, m);
            assert_close(
                &got,
                &scalar64,
                &mag,
                1e-6,
                &format!("{format:?} {level:?}"),
            );
            let same = got
                .iter()
                .zip(&scalar)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{format:?} {level:?} differs from the scalar kernel");
        }
    }
}

#[test]
fn degenerate_rows_do_not_panic_or_leak_into_other_rows() {
    let (n, k) = (24, 128);
    let mut x = Rng::new(16).vec(4 * k);
    x[0] = f32::INFINITY; // row 0: an infinity
    x[k + 40] = f32::NAN; // row 1: a NaN
    x[2 * k..2 * k + 32].iter_mut().for_each(|v| *v *= 1e-39); // row 2: subnormal block
    x[2 * k + 64] = 3e38; // and a huge value
    for format in FORMATS {
        let (_, w) = weights(format, n, k, 17);
        for level in Level::available() {
            let out = matmul(&w, level, &x, 4);
            let alone = matmul(&w, level, &x[3 * k..], 1);
            assert_eq!(out[3 * n..], alone[..], "{format:?} {level:?}");
        }
    }
}

#[test]
fn dequantize_matches_candle() {
    for format in FORMATS {
        let (qt, w) = weights(format, 37, 96, 10);
        let want = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        let got = w.dequantize();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{format:?}"
        );
        let mut row = vec![0f32; 96];
        for r in [0, 15, 16, 36] {
            w.dequantize_row(r, &mut row).unwrap();
            assert_eq!(row, want[r * 96..(r + 1) * 96], "{format:?} row {r}");
        }
        assert!(w.dequantize_row(37, &mut row).is_err());
        assert!(w.dequantize_row(0, &mut row[..95]).is_err());
    }
}

#[test]
fn new_validates_shapes() {
    for format in FORMATS {
        let bytes = 3 * 2 * format.block_bytes();
        assert!(QuantMatrix::new(format, 3, 64, vec![0; bytes]).is_ok());
        assert!(QuantMatrix::new(format, 3, 64, vec![0; bytes - 1]).is_err());
        assert!(QuantMatrix::new(format, 3, 64, vec![0; bytes + 1]).is_err());
        assert!(QuantMatrix::new(format, 2, 96, vec![0; bytes]).is_ok());
        assert!(QuantMatrix::new(format, 3, 48, vec![0; bytes]).is_err());
        assert!(QuantMatrix::new(format, 0, 64, vec![]).is_err());
        assert!(QuantMatrix::new(format, usize::MAX / 2, 64, vec![0; bytes]).is_err());
    }
    let (_, w) = weights(QuantFormat::Q4_1, 16, 64, 11);
    let mut out = vec![0f32; 32];
    assert!(w.matmul(&[1.0; 128], 2, &mut out).is_ok());
    assert!(w.matmul(&[1.0; 127], 2, &mut out).is_err());
    assert!(w.matmul(&[1.0; 128], 2, &mut out[..31]).is_err());
    assert!(w.matmul(&[], 0, &mut []).is_ok());
}

#[test]
fn from_qtensor_skips_other_dtypes() {
    let t = Tensor::from_vec(Rng::new(12).vec(2 * 256), (2, 256), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q4K, GgmlDType::Q8_1] {
        let qt = QTensor::quantize(&t, dtype).unwrap();
        assert!(
            QuantMatrix::from_qtensor(&qt).unwrap().is_none(),
            "{dtype:?}"
        );
    }
    assert_eq!(
        QuantFormat::from_ggml(GgmlDType::Q4_1),
        Some(QuantFormat::Q4_1)
    );
    assert_eq!(QuantFormat::from_ggml(GgmlDType::F16), None);
}

#[test]
fn forward_is_matmul_over_leading_dims() {
    let (n, k) = (24, 64);
    let (_, w) = weights(QuantFormat::Q4_1, n, k, 13);
    let x = Rng::new(14).vec(6 * k);
    let mut want = vec![0f32; 6 * n];
    w.matmul(&x, 6, &mut want).unwrap();
    let xt = Tensor::from_vec(x, (2, 3, k), &Device::Cpu).unwrap();
    let got = w.forward(&xt).unwrap();
    assert_eq!(got.dims(), &[2, 3, n]);
    assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    // A strided view is made contiguous first.
    let xt2 = Tensor::from_vec(Rng::new(15).vec(k * 4), (k, 4), &Device::Cpu).unwrap();
    let strided = w.forward(&xt2.t().unwrap()).unwrap();
    let contiguous = w.forward(&xt2.t().unwrap().contiguous().unwrap()).unwrap();
    assert_eq!(
        strided.to_vec2::<f32>().unwrap(),
        contiguous.to_vec2::<f32>().unwrap()
    );
    assert!(w
        .forward(&xt.to_dtype(candle_core::DType::F16).unwrap())
        .is_err());
    assert!(w
        .forward(&Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap())
        .is_err());
}
