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
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("blk.{i}");
        let inter = config.intermediate_size;
        let q = weight(&format!("{p}.attn_q.weight"), [h * d, hidden])?;
        let k = weight(&format!("{p}.attn_k.weight"), [kvh * d, hidden])?;
        let v = weight(&format!("{p}.attn_v.weight"), [kvh * d, hidden])?;
        let o = Linear::from_qtensor(weight(&format!("{p}.attn_output.weight"), [hidden, h * d])?)?;
        let gate = weight(&format!("{p}.ffn_gate.weight"), [inter, hidden])?;
        let up = weight(&format!("{p}.ffn_up.weight"), [inter, hidden])?;
        let down = Linear::from_qtensor(weight(&format!("{p}.ffn_down.weight"), [hidden, inter])?)?;
        layers.push((p, q, k, v, o, gate, up, down));
    }
    let mut dense = |name: &str| -> Result<Tensor> {
        let t = content
            .tensor(file, name, device)
            .map_err(|e| load_err(name, e))?;
        t.dequantize(device).map_err(|e| load_err(name, e))
    };
    let mut built = Vec::with_capacity(layers.len());
    for (p, q, k, v, o, gate, up, down) in layers {
        built.push(Layer {
            attn_norm: dense(&format!("{p}.attn_norm.weight"))?,
            qkv: FusedLinear::from_qtensors(vec![q, k, v])?,
            o,
            ffn_norm: dense(&format!("{p}.ffn_norm.weight"))?,
            gate_up: FusedLinear::from_qtensors(vec![gate, up])?,
            down,
        });
    }
    let norm = dense("output_norm.weight")?;
    let embd = content
        .tensor(file, "token_embd.weight", device)
        .map_err(|e| load_err("token_embd.weight", e))?;
    let embedding = Embedding(embd.dequantize(device)?);
    let lm_head = if config.tie_word_embeddings {
        Linear::from_qtensor(embd)?
    } else {
        let t = content
            .tensor(file, "output.weight", device)
            .map_err(|e| load_err("output.weight", e))?;
        Linear::from_qtensor(t)?
    };
    Ok(LlamaModel::new(
        config,
        device.clone(),
        activation_dtype(device),
        embedding,
        built,
        norm,
        lm_head,
    ))
}

/// Activations run in f32 on the CPU and in bf16 on accelerators.
pub fn activation_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A Hugging Face llama checkpoint folder: `config.json` and one or more `*.safetensors`.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<LlamaModel> {
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
    let dtype = activation_dtype(device);
    let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| err(format!("missing tensor {name}")))?;
        if t.dims() != shape {
            return Err(shape_error(name, t.dims(), shape));
        }
        Ok(t.to_dtype(dtype)?)
    };
    let weights = build_dense(&config, &mut take, |i, part| {
        let p = format!("model.layers.{i}");
        match part {
            "attn_norm" => format!("{p}.input_layernorm.weight"),
            "ffn_norm" => format!("{p}.post_attention_layernorm.weight"),
            "q" | "k" | "v" | "o" => format!("{p}.self_attn.{part}_proj.weight"),
            _ => format!("{p}.mlp.{part}_proj.weight"),
        }
    })?;
    let embedding = take("model.embed_tokens.weight", &[config.vocab_size, config.hidden_size])?;
    let norm = take("model.norm.weight", &[config.hidden_size])?;
    let lm_head = if config.tie_word_embeddings {
        embedding.clone()
    } else {
        take("lm_head.weight", &[config.vocab_size, config.hidden_size])?
    };
    Ok(LlamaModel::new(
        config,
        device.clone(),
        dtype,
        Embedding(embedding),
        weights,
        norm,
        Linear::Dense(lm_head),
    ))
}

/// Random weights of a named shape. Values are drawn from a seeded generator so every node that
/// builds the same dummy model gets the same weights (and the same greedy output).
pub fn load_dummy(config: ModelConfig, seed: u64, device: &Device) -> Result<LlamaModel> {
    let dtype = activation_dtype(device);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut take = |_name: &str, shape: &[usize]| -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 {
            // Norm weights near one keep activations in range.
            (0..count).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
        } else {
            // Uniform with the standard deviation of a 0.02 normal init scaled by fan-in, so the
            // logits of a deep random model stay finite and varied.
            let fan_in = shape[shape.len() - 1] as f32;
            let bound = (3.0 / fan_in).sqrt();
            (0..count).map(|_| rng.random_range(-bound..bound)).collect()
        };
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    };
    let weights = build_dense(&config, &mut take, |i, part| format!("{i}.{part}"))?;
    let embedding = take("embed", &[config.vocab_size, config.hidden_size])?;
    let norm = take("norm", &[config.hidden_size])?;
    let lm_head = if config.tie_word_embeddings {
        embedding.clone()
    } else {
        take("lm_head", &[config.vocab_size, config.hidden_size])?
    };
    Ok(LlamaModel::new(
        config,
        device.clone(),
        dtype,
        Embedding(embedding),
        weights,
        norm,
        Linear::Dense(lm_head),
    ))
}

/// Layers from dense tensors, fetched by `take(name, shape)` with names from `name(layer, part)`.
fn build_dense(
    config: &ModelConfig,
    take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    name: impl Fn(usize, &str) -> String,
) -> Result<Vec<Layer>> {
    let (h, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let (hidden, inter) = (config.hidden_size, config.intermediate_size);
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let mut w = |part: &str, shape: [usize; 2]| take(&name(i, part), &shape);
        let q = w("q", [h * d, hidden])?;
        let k = w("k", [kvh * d, hidden])?;
        let v = w("v", [kvh * d, hidden])?;
        let o = Linear::Dense(w("o", [hidden, h * d])?);
        let gate = w("gate", [inter, hidden])?;
        let up = w("up", [inter, hidden])?;
        let down = Linear::Dense(w("down", [hidden, inter])?);
        layers.push(Layer {
            attn_norm: take(&name(i, "attn_norm"), &[hidden])?,
            qkv: FusedLinear::from_dense(vec![q, k, v])?,
            o,
            ffn_norm: take(&name(i, "ffn_norm"), &[hidden])?,
            gate_up: FusedLinear::from_dense(vec![gate, up])?,
            down,
        });
    }
    Ok(layers)
}
