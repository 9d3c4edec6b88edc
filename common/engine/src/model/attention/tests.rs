//! The paged-attention op against plain attention over contiguous K/V.

use super::*;
use crate::kv::{KvCache, KvCacheSpec};
use candle_core::Tensor;
use candle_core::{DType, Device, D};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

/// Plain attention over contiguous K/V with a causal mask, in candle ops: the reference.
fn contiguous_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Tensor {
    // q: [n, h, d]; k, v: [ctx, kvh, d]; query i sits at position start + i.
    let (n, h, d) = q.dims3().unwrap();
    let (ctx, kvh, _) = k.dims3().unwrap();
    let group = h / kvh;
    let expand = |t: &Tensor| {
        t.unsqueeze(2)
            .unwrap()
            .repeat((1, 1, group, 1))
            .unwrap()
            .reshape((ctx, h, d))
            .unwrap()
    };
    let (k, v) = (
        expand(k).transpose(0, 1).unwrap(),
        expand(v).transpose(0, 1).unwrap(),
    );
    let q = q.transpose(0, 1).unwrap().contiguous().unwrap(); // [h, n, d]
    let scores =
        (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j <= start + i {
                    0.
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, n, ctx), &Device::Cpu).unwrap();
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    p.matmul(&v.contiguous().unwrap())
        .unwrap()
        .transpose(0, 1)
        .unwrap()
}

#[test]
fn paged_equals_contiguous_for_random_block_layouts() {
    let mut rng = StdRng::seed_from_u64(7);
    for (h, kvh, d, bs) in [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 16, 8), (6, 2, 8, 1)] {
        let spec = KvCacheSpec {
            num_layers: 1,
            num_kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            num_blocks: 400,
            dtype: DType::F32,
        };
        let cache = KvCache::new(spec, &Device::Cpu).unwrap();
        let mut free: Vec<u32> = (0..400).collect();
        free.shuffle(&mut rng);
        // Three sequences: a fresh prompt, a prompt chunk after cached tokens, one decode token.
        let shapes = [(0usize, 37usize), (21, 11), (60, 1)];
        let mut seqs = Vec::new();
        let mut q_parts = Vec::new();
        let mut refs = Vec::new();
        let mut q_start = 0;
        for (cached, new) in shapes {
            let ctx = cached + new;
            let table: Vec<u32> = free.drain(..ctx.div_ceil(bs)).collect();
            let k = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu).unwrap();
            let slots: Vec<u32> = (0..ctx)
                .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            cache.write_slots(0, &k, &v, &slots).unwrap();
            let q = Tensor::randn(0f32, 1., (new, h, d), &Device::Cpu).unwrap();
            refs.push(contiguous_attention(&q, &k, &v, cached));
            q_parts.push(q);
            seqs.push(SeqAttention {
                q_start,
                q_len: new,
                context_len: ctx,
                block_table: table,
            });
            q_start += new;
        }
        // Shuffle the order of sequences in the packed batch too.
        let order = [2usize, 0, 1];
        let mut packed = Vec::new();
        let mut metas = Vec::new();
        let mut at = 0;
        for &i in &order {
            packed.push(q_parts[i].clone());
            metas.push(SeqAttention {
                q_start: at,
                ..seqs[i].clone()
            });
            at += seqs[i].q_len;
        }
        let q = Tensor::cat(&packed, 0).unwrap();
        let meta = Arc::new(AttentionMeta::new(metas, bs, h, kvh, d).unwrap());
        let (kc, vc) = cache.layer(0).unwrap();
        let out = paged_attention(&q, kc, vc, &meta).unwrap();
        let mut at = 0;
        for &i in &order {
            let n = seqs[i].q_len;
            let got = out.narrow(0, at, n).unwrap();
            let diff = (got - &refs[i])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-5,
                "h={h} kvh={kvh} d={d} bs={bs} seq {i}: max diff {diff}"
            );
            at += n;
        }
        let _ = rng.random::<u32>();
    }
}

#[test]
fn inconsistent_metadata_is_an_error() {
    let s = |q_start, q_len, context_len, blocks: usize| SeqAttention {
        q_start,
        q_len,
        context_len,
        block_table: vec![0; blocks],
    };
    assert!(
        AttentionMeta::new(vec![s(0, 3, 2, 1)], 16, 4, 4, 8).is_err(),
        "more queries than context"
    );
    assert!(
        AttentionMeta::new(vec![s(0, 3, 40, 2)], 16, 4, 4, 8).is_err(),
        "too few blocks"
    );
    assert!(
        AttentionMeta::new(vec![s(0, 2, 2, 1), s(1, 2, 2, 1)], 16, 4, 4, 8).is_err(),
        "overlap"
    );
    assert!(
        AttentionMeta::new(vec![s(0, 2, 2, 1)], 16, 6, 4, 8).is_err(),
        "bad GQA ratio"
    );
}
