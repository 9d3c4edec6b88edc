//! Building a [`Tokenizer`] from a Hugging Face `tokenizer.json`
//! ([`Tokenizer::from_tokenizer_json`]): the vocabulary and added tokens from the file, each
//! token's bytes (byte-level or SentencePiece-like), and the special ids and BOS/EOS policy from
//! `tokenizer_config.json` and `generation_config.json` beside it.

use std::collections::HashMap;
use std::path::Path;

use super::decode::{byte_level_decode, bytes_to_unicode, sentencepiece_decode};
use super::{Kind, SpecialIds, Tokenizer, EOG_TOKEN_TEXTS, EOT_TOKEN_TEXTS};
use crate::error::{Error, Result};

impl Tokenizer {
    /// Builds the tokenizer from a Hugging Face `tokenizer.json`. Special tokens and the BOS/EOS
    /// policy come from `tokenizer_config.json` beside it when there is one (and extra
    /// end-of-generation ids from `generation_config.json`); otherwise from the tokenizer's
    /// added tokens and post-processor.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let hf = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        let vocab = hf.get_vocab(true);
        let n_vocab = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if n_vocab == 0 {
            return Err(Error::Tokenizer(format!(
                "{}: the vocabulary is empty",
                path.display()
            )));
        }
        let mut tokens = vec![String::new(); n_vocab];
        for (t, &id) in &vocab {
            tokens[id as usize] = t.clone();
        }
        let mut kinds = vec![Kind::Normal; n_vocab];
        for (id, added) in hf.get_added_tokens_decoder() {
            if let Some(k) = kinds.get_mut(id as usize) {
                *k = if added.special {
                    Kind::Control
                } else {
                    Kind::UserDefined
                };
            }
        }

        // Byte-level tokenizers write tokens in the GPT-2 byte alphabet; others are taken to be
        // SentencePiece-like (`▁` for a space, `<0xAB>` byte-fallback tokens).
        let byte_level = {
            let json = std::fs::read_to_string(path)?;
            let v: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
            json_mentions_type(&v["decoder"], "ByteLevel")
                || json_mentions_type(&v["pre_tokenizer"], "ByteLevel")
        };
        let char_to_byte: HashMap<char, u8> = bytes_to_unicode()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let token_bytes: Vec<Box<[u8]>> = tokens
            .iter()
            .zip(&kinds)
            .map(|(t, k)| match k {
                Kind::Normal if byte_level => byte_level_decode(t, &char_to_byte).into(),
                Kind::Normal => sentencepiece_decode(t).into(),
                _ => t.as_bytes().to_vec().into(),
            })
            .collect();

        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;
        let lookup = |name: &str| vocab.get(name).copied();
        let special_from_config = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let name = match v {
                serde_json::Value::String(s) => s.as_str(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            lookup(name)
        };
        let first_of = |names: &[&str]| names.iter().find_map(|n| lookup(n));
        let mut ids = SpecialIds {
            bos: special_from_config("bos_token")
                .or_else(|| first_of(&["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"])),
            eos: special_from_config("eos_token").or_else(|| {
                first_of(&[
                    "<|end_of_text|>",
                    "<|endoftext|>",
                    "</s>",
                    "<eos>",
                    "<|im_end|>",
                ])
            }),
            pad: special_from_config("pad_token"),
            unk: special_from_config("unk_token"),
            ..Default::default()
        };
        let probe = |add: bool| -> Result<Vec<u32>> {
            Ok(hf
                .encode_fast("a", add)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec())
        };
        let (with, without) = (probe(true)?, probe(false)?);
        let post_adds_bos =
            with.len() > without.len() && ids.bos.is_some() && with.first() == ids.bos.as_ref();
        let post_adds_eos =
            with.len() > without.len() && ids.eos.is_some() && with.last() == ids.eos.as_ref();
        let config_bool = |key: &str| config.as_ref()?.get(key)?.as_bool();
        ids.add_bos = config_bool("add_bos_token").unwrap_or(post_adds_bos) && ids.bos.is_some();
        ids.add_eos = config_bool("add_eos_token").unwrap_or(post_adds_eos) && ids.eos.is_some();
        if let Some(g) = &gen_config {
            match g.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    ids.extra_eog.extend(n.as_u64().map(|x| x as u32))
                }
                Some(serde_json::Value::Array(a)) => ids
                    .extra_eog
                    .extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
        ids.extra_eog.retain(|&id| (id as usize) < n_vocab);
        for text in EOG_TOKEN_TEXTS {
            if let Some(id) = lookup(text) {
                if kinds[id as usize].is_special() {
                    ids.extra_eog.push(id);
                }
            }
        }
        ids.eot = EOT_TOKEN_TEXTS
            .iter()
            .find_map(|t| lookup(t).filter(|&id| kinds[id as usize].is_special()));

        Self::assemble(
            hf,
            tokens,
            token_bytes,
            kinds,
            ids,
            "tokenizer.json".into(),
            "tokenizer.json".into(),
        )
    }
}

fn json_mentions_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(o) => {
            o.get("type").and_then(|t| t.as_str()) == Some(ty)
                || o.values().any(|x| json_mentions_type(x, ty))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| json_mentions_type(x, ty)),
        _ => false,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}
