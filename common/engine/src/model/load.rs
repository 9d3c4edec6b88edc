//! Building a [`LlamaModel`] from its three sources: a GGUF file (quantized weights stay
//! quantized), a Hugging Face folder (`config.json` + `*.safetensors`), or random dummy weights of
//! a named shape.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::config::ModelConfig;
use super::linear::{shape_error, FusedLinear, Linear};
use super::llama::{Embedding, Layer, LlamaModel};
use crate::{Error, Result};

/// Reads a GGUF file's header and metadata, with errors that say what is wrong with the file.
pub fn read_gguf(path: &Path) -> Result<(File, gguf_file::Content)> {
    let mut file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::ModelNotFound(path.to_path_buf()),
        _ => Error::ModelLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::ModelLoad {
        path: path.to_path_buf(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    Ok((file, content))
}

pub fn load_gguf(
    path: &Path,
    file: &mut File,
    content: &gguf_file::Content,
    device: &Device,
    dtype: DType,
) -> Result<LlamaModel> {
    let config = ModelConfig::from_gguf(content)?;
    let load_err = |name: &str, e: candle_core::Error| Error::ModelLoad {
        path: path.to_path_buf(),
        reason: format!("tensor {name}: {e}"),
    };
    let mut tensor = |name: &str| -> Result<QTensor> {
        content
            .tensor(file, name, device)
            .map_err(|e| load_err(name, e))
    };
    let (h, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let hidden = config.hidden_size;
    let mut weight = |name: &str, shape: [usize; 2]| -> Result<QTensor> {
        let t = tensor(name)?;
        if t.shape().dims() != shape {
            return Err(shape_error(name, t.shape().dims(), &shape));
        }
        Ok(t)
    };
    // On the CPU quantized weights stay quantized (our kernels); on a GPU they are dequantized
    // to the activation dtype and run through cuBLAS.
    let quantized = device.is_cpu();
    let linear = |t: QTensor| -> Result<Linear> {
        if quantized {
            Linear::from_qtensor(t)
        } else {
            Ok(Linear::Dense(t.dequantize(device)?.to_dtype(dtype)?))
        }
    };
    let fused = |parts: Vec<QTensor>| -> Result<FusedLinear> {
        if quantized {
            FusedLinear::from_qtensors(parts)
        } else {
            let dense = parts
                .iter()
                .map(|t| Ok(t.dequantize(device)?.to_dtype(dtype)?))
                .collect::<Result<Vec<_>>>()?;
            FusedLinear::from_dense(dense)
        }
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("blk.{i}");
        let inter = config.intermediate_size;
        let q = weight(&format!("{p}.attn_q.weight"), [h * d, hidden])?;
        let k = weight(&format!("{p}.attn_k.weight"), [kvh * d, hidden])?;
        let v = weight(&format!("{p}.attn_v.weight"), [kvh * d, hidden])?;
        let o = linear(weight(&format!("{p}.attn_output.weight"), [hidden, h * d])?)?;
        let gate = weight(&format!("{p}.ffn_gate.weight"), [inter, hidden])?;
        let up = weight(&format!("{p}.ffn_up.weight"), [inter, hidden])?;
        let down = linear(weight(&format!("{p}.ffn_down.weight"), [hidden, inter])?)?;
        layers.push((p, q, k, v, o, gate, up, down));
    }
    let mut dense = |name: &str| -> Result<Tensor> {
        let t = content
            .tensor(file, name, device)
            .map_err(|e| load_err(name, e))?;
        let t = t.dequantize(device).map_err(|e| load_err(name, e))?;
        Ok(t.to_dtype(dtype)?)
    };
    let mut built = Vec::with_capacity(layers.len());
    for (p, q, k, v, o, gate, up, down) in layers {
        built.push(Layer {
            attn_norm: dense(&format!("{p}.attn_norm.weight"))?,
            qkv: fused(vec![q, k, v])?,
            o,
            ffn_norm: dense(&format!("{p}.ffn_norm.weight"))?,
            gate_up: fused(vec![gate, up])?,
            down,
        });
    }
    let norm = dense("output_norm.weight")?;
    let embd = content
        .tensor(file, "token_embd.weight", device)
        .map_err(|e| load_err("token_embd.weight", e))?;
    let embedding = Embedding(embd.dequantize(device)?.to_dtype(dtype)?);
    let lm_head = if config.tie_word_embeddings {
        if quantized {
            linear(embd)?
        } else {
            Linear::Dense(embedding.0.clone())
        }
    } else {
        let t = content
            .tensor(file, "output.weight", device)
            .map_err(|e| load_err("output.weight", e))?;
        linear(t)?
    };
    Ok(LlamaModel::new(
        config,
        device.clone(),
        dtype,
        embedding,
        built,
        norm,
        lm_head,
    ))
}

/// Activations run in f32 on the CPU and in bf16 on accelerators, unless asked otherwise.
pub fn activation_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A Hugging Face llama checkpoint folder: `config.json` and one or more `*.safetensors`.
pub fn load_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<LlamaModel> {
    let err = |reason: String| Error::ModelLoad {
        path: dir.to_path_buf(),
        reason,
    };
    let json = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| err(format!("config.json: {e}")))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let config = ModelConfig::from_hf_json(&json, &name)?;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err("no *.safetensors file".into()));
    }
    let mut tensors = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| err(format!("{}: {e}", f.display())))?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| err(format!("missing tensor {name}")))?;
        if t.dims() != shape {
            return Err(shape_error(name, t.dims(), shape));
        }
        Ok(t.to_dtype(dtype)?)
    };
    build_dense(config, device, dtype, &mut take, |layer, part| {
        let Some(i) = layer else {
            return match part {
                "embed" => "model.embed_tokens.weight".into(),
                "norm" => "model.norm.weight".into(),
                _ => "lm_head.weight".into(),
            };
        };
        let p = format!("model.layers.{i}");
        match part {
            "attn_norm" => format!("{p}.input_layernorm.weight"),
            "ffn_norm" => format!("{p}.post_attention_layernorm.weight"),
            "q" | "k" | "v" | "o" => format!("{p}.self_attn.{part}_proj.weight"),
            _ => format!("{p}.mlp.{part}_proj.weight"),
        }
    })
}

/// Dummy models up to this many parameters are drawn on the CPU, so a GPU gets the very same
/// weights as the CPU path; larger ones are drawn on the device itself.
const DUMMY_HOST_PARAMS: usize = 400_000_000;

/// Random weights of a named shape. Values are drawn from a seeded generator so every node that
/// builds the same dummy model gets the same weights (and the same greedy output).
pub fn load_dummy(
    config: ModelConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<LlamaModel> {
    let on_device = !device.is_cpu() && config.num_params() > DUMMY_HOST_PARAMS;
    if on_device {
        device.set_seed(seed)?;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut take = |_name: &str, shape: &[usize]| -> Result<Tensor> {
        if on_device {
            let t = if shape.len() == 1 {
                (Tensor::rand(-0.1f32, 0.1, shape, device)? + 1.0)?
            } else {
                let bound = (3.0 / shape[shape.len() - 1] as f64).sqrt() as f32;
                Tensor::rand(-bound, bound, shape, device)?
            };
            return Ok(t.to_dtype(dtype)?);
        }
        let count: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 {
            // Norm weights near one keep activations in range.
            (0..count)
                .map(|_| 1.0 + rng.random_range(-0.1..0.1))
                .collect()
        } else {
            // Uniform with the standard deviation of a 0.02 normal init scaled by fan-in, so the
            // logits of a deep random model stay finite and varied.
            let fan_in = shape[shape.len() - 1] as f32;
            let bound = (3.0 / fan_in).sqrt();
            (0..count)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        };
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    };
    build_dense(
        config,
        device,
        dtype,
        &mut take,
        |layer, part| match layer {
            Some(i) => format!("{i}.{part}"),
            None => part.to_string(),
        },
    )
}

/// A model from dense tensors, fetched by `take(name, shape)` with names from
/// `name(Some(layer), part)` for layer weights and `name(None, "embed" | "norm" | "lm_head")`.
fn build_dense(
    config: ModelConfig,
    device: &Device,
    dtype: DType,
    take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    name: impl Fn(Option<usize>, &str) -> String,
) -> Result<LlamaModel> {
    let (h, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let (hidden, inter) = (config.hidden_size, config.intermediate_size);
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let mut w = |part: &str, shape: [usize; 2]| take(&name(Some(i), part), &shape);
        let q = w("q", [h * d, hidden])?;
        let k = w("k", [kvh * d, hidden])?;
        let v = w("v", [kvh * d, hidden])?;
        let o = Linear::Dense(w("o", [hidden, h * d])?);
        let gate = w("gate", [inter, hidden])?;
        let up = w("up", [inter, hidden])?;
        let down = Linear::Dense(w("down", [hidden, inter])?);
        layers.push(Layer {
            attn_norm: take(&name(Some(i), "attn_norm"), &[hidden])?,
            qkv: FusedLinear::from_dense(vec![q, k, v])?,
            o,
            ffn_norm: take(&name(Some(i), "ffn_norm"), &[hidden])?,
            gate_up: FusedLinear::from_dense(vec![gate, up])?,
            down,
        });
    }
    let embedding = take(&name(None, "embed"), &[config.vocab_size, hidden])?;
    let norm = take(&name(None, "norm"), &[hidden])?;
    let lm_head = if config.tie_word_embeddings {
        embedding.clone()
    } else {
        take(&name(None, "lm_head"), &[config.vocab_size, hidden])?
    };
    Ok(LlamaModel::new(
        config,
        device.clone(),
        dtype,
        Embedding(embedding),
        layers,
        norm,
        Linear::Dense(lm_head),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCache, KvCacheSpec};
    use crate::model::{ForwardBatch, ModelSource};
    use candle_core::D;

    fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    /// Hugging Face's rotate_half RoPE for `[n, heads, d]` at positions 0..n.
    fn rope_halves(x: &Tensor, theta: f32) -> Tensor {
        let (n, heads, d) = x.dims3().unwrap();
        let mut out = x.to_vec3::<f32>().unwrap();
        for (p, tok) in out.iter_mut().enumerate() {
            for head in tok.iter_mut().take(heads) {
                let orig = head.clone();
                for i in 0..d / 2 {
                    let angle = p as f32 / theta.powf(2.0 * i as f32 / d as f32);
                    let (c, s) = (angle.cos(), angle.sin());
                    head[i] = orig[i] * c - orig[i + d / 2] * s;
                    head[i + d / 2] = orig[i + d / 2] * c + orig[i] * s;
                }
            }
        }
        let flat: Vec<f32> = out.into_iter().flatten().flatten().collect();
        Tensor::from_vec(flat, (n, heads, d), &Device::Cpu).unwrap()
    }

    /// A plain, unbatched llama forward over contiguous tensors: the reference.
    fn reference_logits(c: &ModelConfig, w: &HashMap<String, Tensor>, ids: &[u32]) -> Vec<f32> {
        let n = ids.len();
        let (h, kvh, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let g = |name: &str| w[name].clone();
        let lin = |x: &Tensor, name: &str| x.matmul(&g(name).t().unwrap()).unwrap();
        let idx = Tensor::new(ids, &Device::Cpu).unwrap();
        let mut x = g("model.embed_tokens.weight")
            .index_select(&idx, 0)
            .unwrap();
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j <= i { 0. } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, n, n), &Device::Cpu).unwrap();
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let hs = rms_norm(
                &x,
                &g(&format!("{p}.input_layernorm.weight")),
                c.rms_norm_eps,
            );
            let q = rope_halves(
                &lin(&hs, &format!("{p}.self_attn.q_proj.weight"))
                    .reshape((n, h, d))
                    .unwrap(),
                c.rope_theta,
            );
            let k = rope_halves(
                &lin(&hs, &format!("{p}.self_attn.k_proj.weight"))
                    .reshape((n, kvh, d))
                    .unwrap(),
                c.rope_theta,
            );
            let v = lin(&hs, &format!("{p}.self_attn.v_proj.weight"))
                .reshape((n, kvh, d))
                .unwrap();
            let rep = |t: &Tensor| {
                t.unsqueeze(2)
                    .unwrap()
                    .repeat((1, 1, h / kvh, 1))
                    .unwrap()
                    .reshape((n, h, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (k, v) = (rep(&k), rep(&v));
            let q = q.transpose(0, 1).unwrap().contiguous().unwrap();
            let att = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let att =
                candle_nn::ops::softmax(&att.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            let o = att
                .matmul(&v)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((n, h * d))
                .unwrap();
            x = (x + lin(&o, &format!("{p}.self_attn.o_proj.weight"))).unwrap();
            let hs = rms_norm(
                &x,
                &g(&format!("{p}.post_attention_layernorm.weight")),
                c.rms_norm_eps,
            );
            let act = (candle_nn::ops::silu(&lin(&hs, &format!("{p}.mlp.gate_proj.weight")))
                .unwrap()
                * lin(&hs, &format!("{p}.mlp.up_proj.weight")))
            .unwrap();
            x = (x + lin(&act, &format!("{p}.mlp.down_proj.weight"))).unwrap();
        }
        let x = rms_norm(&x, &g("model.norm.weight"), c.rms_norm_eps);
        lin(&x.narrow(0, n - 1, 1).unwrap(), "model.embed_tokens.weight")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn run(model: &LlamaModel, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
        let c = model.config();
        let spec = KvCacheSpec {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: 4,
            num_blocks: 16,
            dtype: DType::F32,
        };
        let cache = KvCache::new(spec, &Device::Cpu).unwrap();
        let table: Vec<u32> = vec![9, 2, 14, 5, 0, 7];
        let mut at = 0;
        let mut logits = Vec::new();
        for &len in chunks {
            let mut batch = ForwardBatch::default();
            batch.push_seq(&ids[at..at + len], at, &table, 1);
            logits = model
                .forward(&batch, &cache, &mut |_| Ok(()))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            at += len;
        }
        logits
    }

    #[test]
    fn hugging_face_folder_matches_a_plain_reference_forward() {
        let config = ModelConfig::preset("tiny").unwrap();
        let (h, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
        let (hidden, inter, vocab) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
            ("model.norm.weight".into(), vec![hidden]),
        ];
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![hidden]),
                (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
                (format!("{p}.self_attn.q_proj.weight"), vec![h * d, hidden]),
                (
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![kvh * d, hidden],
                ),
                (
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![kvh * d, hidden],
                ),
                (format!("{p}.self_attn.o_proj.weight"), vec![hidden, h * d]),
                (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
                (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
                (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            ]);
        }
        let weights: HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = if shape.len() == 1 {
                    (Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap() + 1.0).unwrap()
                } else {
                    Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap()
                };
                (name, t)
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("pd-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":{hidden},
            "intermediate_size":{inter},"num_hidden_layers":{},"num_attention_heads":{h},
            "num_key_value_heads":{kvh},"rope_theta":{},"rms_norm_eps":1e-5,
            "max_position_embeddings":1024,"tie_word_embeddings":true}}"#,
            config.num_layers, config.rope_theta
        );
        std::fs::write(dir.join("config.json"), json).unwrap();

        let loaded = crate::model::load(&ModelSource::HfDir(dir.clone()), &Device::Cpu).unwrap();
        let hf_config = loaded.model.config().clone();
        let ids = [3u32, 77, 501, 12, 9, 300, 42, 42, 7, 128, 1];
        let want = reference_logits(&hf_config, &weights, &ids);
        for chunks in [vec![11], vec![4, 1, 6], vec![1; 11]] {
            let got = run(&loaded.model, &ids, &chunks);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-3,
                "chunks {chunks:?}: max logit difference {diff}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dummy_weights_are_seeded_and_give_finite_logits() {
        let load = |seed| {
            load_dummy(
                ModelConfig::preset("tiny").unwrap(),
                seed,
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
        };
        let ids = [1u32, 2, 3, 4, 5];
        let a = run(&load(1), &ids, &[5]);
        assert!(a.iter().all(|x| x.is_finite()));
        assert_eq!(a, run(&load(1), &ids, &[5]), "same seed, same weights");
        assert_ne!(a, run(&load(2), &ids, &[5]), "another seed, other weights");
    }
}
