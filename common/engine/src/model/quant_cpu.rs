//! Fast CPU matmul against GGML-quantized weights (Q4_0, Q4_1, Q8_0) with llama.cpp's numerics.
//!
//! # Why this exists
//!
//! The engine runs a GGUF model (SmolLM2-135M: every linear weight Q4_1, the tied output /
//! embedding matrix Q8_0) on CPU. candle's Q4_1 × Q8_1 dot product is a scalar loop and its
//! AVX paths for Q4_0 / Q8_0 are gated on compile-time target features, so decoding with
//! candle's `QMatMul` is slow. This module is a drop-in replacement for those formats.
//!
//! # Numerics (the same as llama.cpp / ggml)
//!
//! Activations are quantized per 32-element block to the weight's "vec dot type" exactly as
//! ggml's reference `quantize_row_q8_1` / `quantize_row_q8_0` do: `d = amax / 127`,
//! `q = roundf(x / d)` (computed as `x * (1/d)`, rounding half away from zero), `d` stored as
//! f16 and, for Q8_1, `s = f16(d * sum(q))`. Each block's integer dot product is exact and is
//! then scaled:
//!
//! * Q4_1 (activations Q8_1): `d_w * d_x * sum(q4 * q8) + m_w * s_x`
//! * Q4_0 (activations Q8_0): `d_w * d_x * sum((q4 - 8) * q8)`
//! * Q8_0 (activations Q8_0): `d_w * d_x * sum(q8 * q8)`
//!
//! Per output element the blocks are accumulated in order with fused multiply-adds:
//! `acc = fma(isum, d_w * d_x, acc)` (then `acc = fma(m_w, s_x, acc)` for Q4_1).
//!
//! # Batch invariance
//!
//! `out[i, j]` is bit-identical whatever the batch size `m`, whichever other rows are in `x`,
//! however the work is split across threads and whether the row or column falls in a tail.
//! Activation rows are quantized independently; every output element lives in its own SIMD
//! lane (or scalar accumulator) and goes through the same sequence of IEEE operations in
//! every code path: the integer block sums are exact, and the float accumulation order above
//! is fixed. Register blocking only changes how many independent elements are in flight. The
//! scalar fallback, the AVX2 kernel and the AVX-512 VNNI kernel all perform that same
//! sequence, so they agree bit for bit as well (the tests check it).
//!
//! # Speed
//!
//! At construction the weights are repacked into tiles of 16 output rows: for each 32-element
//! block, the quants of the 16 rows are interleaved four k-values at a time, so one
//! `vpdpbusd` (AVX-512 VNNI; `vpmaddubsw` + `vpmaddwd` on plain AVX2) multiplies four k-values
//! for 16 (8) output features against one broadcast group of activations. Block scales stay
//! f16 (converted with F16C), so the repacked matrix is no larger than the GGUF bytes and a
//! single decode step streams the weights once. Work is split over the rayon pool by groups of
//! tiles; each task reads its weight tiles once and applies them to all `m` activation rows
//! (several rows at a time in registers), which is what makes batched decode fast. The CPU
//! level is detected at run time, once.
//!
//! Starting a parallel section from a thread outside the rayon pool costs a thread handoff of
//! several microseconds, which is as much as a whole small single-row matmul; started from a
//! pool worker it costs well under one. Callers that run many matmuls in a row (a model
//! forward pass) should therefore run them inside the pool (`rayon::scope`, or
//! `ThreadPool::install`). From outside, tiny products run on the calling thread and the
//! others are handed to the pool in one piece.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Tensor;
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};
use activations::quantize_activations;
use scalar::scalar_tile;

mod activations;
mod op;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Elements per GGML block (all formats here).
const QK: usize = 32;
/// Output rows per repacked tile (one 512-bit lane of f32 per row).
const TILE: usize = 16;
/// Largest number of activation rows any kernel keeps in registers at once.
const MAX_ROWS: usize = 8;

/// Least work (multiply-adds) worth a parallel task.
const MIN_TASK_MACS: usize = 1 << 16;
/// Least work (multiply-adds) worth handing from a thread outside the rayon pool to the pool.
const MIN_HANDOFF_MACS: usize = 1 << 19;
/// Least activation elements worth quantizing in parallel.
const MIN_PAR_QUANT: usize = 1 << 13;

// Format ids used as const generic parameters of the kernels.
const FMT_Q4_0: u8 = 0;
const FMT_Q4_1: u8 = 1;
const FMT_Q8_0: u8 = 2;

/// Weight formats with a fast CPU kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QuantFormat {
    /// The format for a GGML dtype, or `None` when there is no kernel for it here.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one 32-element GGML block in the GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    fn id(self) -> u8 {
        match self {
            Self::Q4_0 => FMT_Q4_0,
            Self::Q4_1 => FMT_Q4_1,
            Self::Q8_0 => FMT_Q8_0,
        }
    }

    /// Bytes of quants per block per tile in the repacked layout.
    fn tile_qs_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => TILE * QK / 2,
            Self::Q8_0 => TILE * QK,
        }
    }
}

/// Where things are inside one repacked tile of 16 output rows. A tile is
/// `[quants: nb * qs_block][d: nb * 16 f16][m: nb * 16 f16 (Q4_1 only)]`, padded to 64 bytes.
///
/// Quants of block `b`, group `g`, row `r` are the 4 bytes at `b * qs_block + g * 64 + r * 4`:
/// for Q4 they are the GGUF bytes `qs[4g..4g + 4]` (low nibbles: elements `4g..4g + 4`, high
/// nibbles: elements `16 + 4g..16 + 4g + 4`); for Q8_0, elements `4g..4g + 4` stored as `q + 128`.
#[derive(Debug, Clone, Copy)]
struct TileGeom {
    /// Blocks per row (k / 32).
    nb: usize,
    /// Bytes of quants per block.
    qs_block: usize,
    /// Offset of the f16 scales `d`.
    d_off: usize,
    /// Offset of the f16 mins `m` (Q4_1).
    m_off: usize,
    /// Bytes per tile, a multiple of 64.
    stride: usize,
}

impl TileGeom {
    fn new(format: QuantFormat, k: usize) -> Self {
        let nb = k / QK;
        let qs_block = format.tile_qs_bytes();
        let d_off = nb * qs_block;
        let m_off = d_off + nb * TILE * 2;
        let end = match format {
            QuantFormat::Q4_1 => m_off + nb * TILE * 2,
            _ => m_off,
        };
        Self {
            nb,
            qs_block,
            d_off,
            m_off,
            stride: end.div_ceil(64) * 64,
        }
    }
}

/// 64 bytes, 64-byte aligned: the storage unit of the repacked tiles.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

/// The activations of one call quantized to Q8_1 / Q8_0: `m` rows of `k` quants, and per
/// block the scale `d` (f16-rounded, as f32), `s = f16(d * sum(q))` (Q8_1) and `sum(q)`.
#[derive(Default)]
struct ActQuant {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    sum: Vec<i32>,
}

/// A view of quantized activations handed to the kernels.
#[derive(Clone, Copy)]
struct XRows<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    sum: &'a [i32],
    k: usize,
    nb: usize,
}

/// The instruction set the kernels use; the same numbers come out of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Level {
    /// The best level this CPU supports, detected once.
    fn detect() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                let avx512 = avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni");
                if avx512 {
                    return Level::Avx512Vnni;
                }
                if avx2 {
                    return Level::Avx2;
                }
            }
            Level::Scalar
        })
    }

    /// Every level this CPU can run, for tests.
    #[cfg(test)]
    fn available() -> Vec<Level> {
        let mut levels = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Level::detect();
            if best != Level::Scalar {
                levels.push(Level::Avx2);
            }
            if best == Level::Avx512Vnni {
                levels.push(Level::Avx512Vnni);
            }
        }
        levels
    }

    /// Activation rows a kernel of this level keeps in registers at once (at most `MAX_ROWS`).
    fn row_block(self) -> usize {
        match self {
            Level::Scalar => MAX_ROWS,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => 4,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => 8,
        }
    }
}

/// A `[n, k]` quantized weight (n output features, each row k inputs as consecutive GGML
/// blocks), built from raw bytes as in the GGUF file and kept repacked for the kernels.
#[derive(Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    n: usize,
    k: usize,
    geom: TileGeom,
    tiles: Vec<Align64>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl QuantMatrix {
    /// Takes `n` rows of `k / 32` GGML blocks each (row-major, as stored in GGUF).
    pub fn new(format: QuantFormat, n: usize, k: usize, data: Vec<u8>) -> Result<Self> {
        if n == 0 || k == 0 || !k.is_multiple_of(QK) {
            return Err(Error::UnsupportedModel(format!(
                "{format:?} weight of shape [{n}, {k}]: both dimensions must be positive and \
                 k a multiple of {QK}"
            )));
        }
        let nb = k / QK;
        let bb = format.block_bytes();
        let expected = n.checked_mul(nb).and_then(|v| v.checked_mul(bb));
        if expected != Some(data.len()) {
            return Err(Error::UnsupportedModel(format!(
                "{format:?} weight of shape [{n}, {k}] needs {} bytes, got {}",
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                data.len()
            )));
        }
        let geom = TileGeom::new(format, k);
        let ntiles = n.div_ceil(TILE);
        let mut tiles = vec![Align64([0; 64]); ntiles * geom.stride / 64];
        let bytes = as_bytes_mut(&mut tiles);
        for (row, row_data) in data.chunks_exact(nb * bb).enumerate() {
            let tile = &mut bytes[(row / TILE) * geom.stride..][..geom.stride];
            let lane = row % TILE;
            for (b, blk) in row_data.chunks_exact(bb).enumerate() {
                let d_at = geom.d_off + b * TILE * 2 + lane * 2;
                tile[d_at..d_at + 2].copy_from_slice(&blk[0..2]);
                let qs = match format {
                    QuantFormat::Q4_0 => &blk[2..18],
                    QuantFormat::Q4_1 => {
                        let m_at = geom.m_off + b * TILE * 2 + lane * 2;
                        tile[m_at..m_at + 2].copy_from_slice(&blk[2..4]);
                        &blk[4..20]
                    }
                    QuantFormat::Q8_0 => &blk[2..34],
                };
                for (g, group) in qs.chunks_exact(4).enumerate() {
                    let at = b * geom.qs_block + g * 64 + lane * 4;
                    for (dst, &src) in tile[at..at + 4].iter_mut().zip(group) {
                        *dst = match format {
                            QuantFormat::Q8_0 => src ^ 0x80,
                            _ => src,
                        };
                    }
                }
            }
        }
        Ok(Self {
            format,
            n,
            k,
            geom,
            tiles,
        })
    }

    /// The matrix of a 2-D `QTensor` of shape `[n, k]`, or `None` when its dtype has no fast
    /// kernel here.
    pub fn from_qtensor(t: &candle_core::quantized::QTensor) -> Result<Option<Self>> {
        let Some(format) = QuantFormat::from_ggml(t.dtype()) else {
            return Ok(None);
        };
        let (n, k) = t.shape().dims2()?;
        let data = t.data()?.into_owned();
        Self::new(format, n, k, data).map(Some)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// `out[m, n] = x[m, k] · Wᵀ`, `x` and `out` row-major f32.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_with(Level::detect(), x, m, out)
    }

    fn matmul_with(&self, level: Level, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if m.checked_mul(k) != Some(x.len()) || m.checked_mul(n) != Some(out.len()) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "quantized matmul [{m}, {k}] x [{n}, {k}]^T: got {} inputs and room for {} \
                 outputs",
                x.len(),
                out.len()
            ))));
        }
        if m == 0 {
            return Ok(());
        }
        let mut run = |parallel: bool| {
            thread_local! {
                static SCRATCH: Cell<ActQuant> = Cell::new(ActQuant::default());
            }
            // Taken out rather than borrowed: a worker that runs another matmul while this one
            // waits just allocates its own buffer.
            let mut aq = SCRATCH.with(Cell::take);
            quantize_activations(level, x, m, k, &mut aq, parallel);
            let xr = XRows {
                qs: &aq.qs,
                d: &aq.d,
                s: &aq.s,
                sum: &aq.sum,
                k,
                nb: k / QK,
            };
            self.compute(level, &xr, m, out, parallel);
            SCRATCH.with(|c| c.set(aq));
        };
        // A parallel section started from a pool worker costs well under a microsecond; one
        // started from outside the pool costs a thread handoff (several microseconds). So from
        // outside, small products run right here and larger ones go to the pool in one piece.
        if rayon::current_thread_index().is_some() {
            run(true);
        } else if m * n * k < MIN_HANDOFF_MACS {
            run(false);
        } else {
            rayon::scope(|_| run(true));
        }
        Ok(())
    }

    /// Runs the kernels over all tiles, in parallel over groups of tiles.
    fn compute(&self, level: Level, xr: &XRows<'_>, m: usize, out: &mut [f32], parallel: bool) {
        let n = self.n;
        let ntiles = n.div_ceil(TILE);
        // About 8 tasks per thread: even shares, and slack for work stealing when a core is
        // busy elsewhere. Each task streams its tiles once for all m rows.
        let per_task = ntiles
            .div_ceil(rayon::current_num_threads() * 8)
            .max(MIN_TASK_MACS.div_ceil(m * TILE * self.k));
        let ntasks = ntiles.div_ceil(per_task);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let bytes = as_bytes(&self.tiles);
        let task = |task: usize| {
            let mut buf = [[0f32; TILE]; MAX_ROWS];
            for t in task * per_task..((task + 1) * per_task).min(ntiles) {
                let tile = &bytes[t * self.geom.stride..(t + 1) * self.geom.stride];
                let col0 = t * TILE;
                let cols = TILE.min(n - col0);
                let mut row0 = 0;
                while row0 < m {
                    let rows = self.run_tile(level, tile, xr, row0, m - row0, &mut buf);
                    for (r, vals) in buf[..rows].iter().enumerate() {
                        // SAFETY: `out` has m * n elements (checked by the caller), row0 + r < m
                        // and col0 + cols <= n; tasks own disjoint column ranges, so no two
                        // threads write the same element and nobody reads `out` meanwhile.
                        unsafe {
                            let dst = out_ptr.get().add((row0 + r) * n + col0);
                            std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, cols);
                        }
                    }
                    row0 += rows;
                }
            }
        };
        if parallel {
            (0..ntasks).into_par_iter().for_each(task);
        } else {
            (0..ntasks).for_each(task);
        }
    }

    /// Computes one tile for up to `left` activation rows starting at `row0` into `buf`;
    /// returns how many rows it did.
    fn run_tile(
        &self,
        level: Level,
        tile: &[u8],
        xr: &XRows<'_>,
        row0: usize,
        left: usize,
        buf: &mut [[f32; TILE]; MAX_ROWS],
    ) -> usize {
        // Largest power of two <= min(left, row block): every row count is handled by the
        // same per-element code, so the split does not change any result.
        let cap = left.min(level.row_block());
        let rows = 1 << (usize::BITS - 1 - cap.leading_zeros());
        let g = &self.geom;
        match level {
            Level::Scalar => scalar_tile(self.format.id(), tile, g, xr, row0, &mut buf[..rows]),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 | Level::Avx512Vnni => {
                debug_assert!(tile.len() >= g.stride && xr.qs.len() >= (row0 + rows) * xr.k);
                // SAFETY: the level was detected on this CPU; `tile` is a whole tile of this
                // geometry and `xr` holds rows row0..row0 + rows (both checked above in debug,
                // guaranteed by `matmul_with`).
                unsafe {
                    x86::tile(
                        level,
                        self.format.id(),
                        tile.as_ptr(),
                        g,
                        xr,
                        row0,
                        rows,
                        buf,
                    )
                }
            }
        }
        rows
    }

    /// Dequantizes to f32 `[n, k]`, row-major (the same values as candle's `dequantize`).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (row, dst) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row_unchecked(row, dst);
        }
        out
    }

    /// Dequantizes row `row` (e.g. the embedding of one token id) into `out[..k]`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.n {
            return Err(Error::invalid(format!(
                "row {row} is out of range for a matrix of {} rows",
                self.n
            )));
        }
        if out.len() != self.k {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "dequantize_row: output has {} elements, the row has {}",
                out.len(),
                self.k
            ))));
        }
        self.dequantize_row_unchecked(row, out);
        Ok(())
    }

    fn dequantize_row_unchecked(&self, row: usize, out: &mut [f32]) {
        let g = &self.geom;
        let tile = &as_bytes(&self.tiles)[(row / TILE) * g.stride..][..g.stride];
        let lane = row % TILE;
        let half_at = |off: usize, b: usize| {
            let at = off + b * TILE * 2 + lane * 2;
            f16::from_le_bytes([tile[at], tile[at + 1]]).to_f32()
        };
        for (b, ys) in out.chunks_exact_mut(QK).enumerate() {
            let d = half_at(g.d_off, b);
            let m = match self.format {
                QuantFormat::Q4_1 => half_at(g.m_off, b),
                _ => 0.0,
            };
            for grp in 0..g.qs_block / 64 {
                let at = b * g.qs_block + grp * 64 + lane * 4;
                for (i, &u) in tile[at..at + 4].iter().enumerate() {
                    let j = 4 * grp + i;
                    match self.format {
                        QuantFormat::Q4_0 => {
                            ys[j] = ((u & 0x0F) as i32 - 8) as f32 * d;
                            ys[j + QK / 2] = ((u >> 4) as i32 - 8) as f32 * d;
                        }
                        QuantFormat::Q4_1 => {
                            ys[j] = (u & 0x0F) as f32 * d + m;
                            ys[j + QK / 2] = (u >> 4) as f32 * d + m;
                        }
                        QuantFormat::Q8_0 => ys[j] = ((u ^ 0x80) as i8) as f32 * d,
                    }
                }
            }
        }
    }

    /// Same as a candle op: `x` is an f32 CPU tensor `[.., k]`; returns `[.., n]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            candle_core::bail!("{}: this kernel is CPU-only", op::OP_NAME);
        }
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        x.apply_op1_no_bwd(&op::QuantMatMulOp(self))
    }
}

/// The output pointer shared by the worker tasks (each writes its own columns).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it, see `QuantMatrix::compute`.
unsafe impl Send for OutPtr {}
// SAFETY: as for Send: no two tasks touch the same element, and nobody reads meanwhile.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method, so closures capture the whole (Send) wrapper rather than the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn as_bytes(v: &[Align64]) -> &[u8] {
    // SAFETY: Align64 is 64 plain bytes without padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 64) }
}

fn as_bytes_mut(v: &mut [Align64]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 64) }
}
