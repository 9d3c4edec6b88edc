//! Building a [`Tokenizer`] from a GGUF file's `tokenizer.ggml.*` metadata
//! ([`Tokenizer::from_gguf`]): the metadata readers, the vocabulary, token types and special ids,
//! the BPE model and merges, the added (control and user-defined) tokens, and each token's bytes.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::decode::{byte_level_decode, bytes_to_unicode};
use super::pretokenize::{build_pre_tokenizer, pre_tokenizer_spec};
use super::{Kind, SpecialIds, Tokenizer, EOG_TOKEN_TEXTS, EOT_TOKEN_TEXTS};
use crate::error::{Error, Result};

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    content.metadata.get(key)
}

fn meta_string(content: &gguf_file::Content, key: &str) -> Result<Option<String>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.clone()))
            .map_err(|e| Error::Tokenizer(format!("{key}: {e}"))),
    }
}

fn meta_string_array(content: &gguf_file::Content, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = meta(content, key) else {
        return Ok(None);
    };
    let arr = v
        .to_vec()
        .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn value_to_i64(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::U64(x) => i64::try_from(*x).ok()?,
        V::I64(x) => *x,
        V::Bool(b) => *b as i64,
        _ => return None,
    })
}

fn meta_id(content: &gguf_file::Content, key: &str, n_vocab: usize) -> Option<u32> {
    let id = value_to_i64(meta(content, key)?)?;
    if id >= 0 && (id as u64) < n_vocab as u64 {
        Some(id as u32)
    } else {
        tracing::warn!("{key} = {id} is not a token id (vocabulary of {n_vocab}); ignored");
        None
    }
}

fn meta_bool(content: &gguf_file::Content, key: &str) -> Option<bool> {
    match meta(content, key)? {
        gguf_file::Value::Bool(b) => Some(*b),
        other => value_to_i64(other).map(|x| x != 0),
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let model = meta_string(content, "tokenizer.ggml.model")?
            .ok_or_else(|| Error::Tokenizer("the GGUF has no tokenizer.ggml.model".into()))?;
        match model.as_str() {
            "gpt2" => {}
            "llama" => {
                return Err(Error::Tokenizer(
                    "tokenizer.ggml.model = \"llama\" (SentencePiece) is not supported; only \
                     byte-level BPE (\"gpt2\") models are"
                        .into(),
                ))
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.model = {other:?} is not supported; only byte-level BPE \
                     (\"gpt2\") models are"
                )))
            }
        }
        let tokens = meta_string_array(content, "tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::Tokenizer("the GGUF has no tokenizer.ggml.tokens".into()))?;
        let n_vocab = tokens.len();
        if n_vocab == 0 || n_vocab > u32::MAX as usize {
            return Err(Error::Tokenizer(format!(
                "bad vocabulary size {n_vocab} in tokenizer.ggml.tokens"
            )));
        }
        let merges = meta_string_array(content, "tokenizer.ggml.merges")?.ok_or_else(|| {
            Error::Tokenizer("the GGUF has no tokenizer.ggml.merges (needed for BPE)".into())
        })?;
        let mut kinds = match meta(content, "tokenizer.ggml.token_type") {
            None => vec![Kind::Normal; n_vocab],
            Some(v) => {
                let arr = v
                    .to_vec()
                    .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.token_type: {e}")))?;
                if arr.len() != n_vocab {
                    return Err(Error::Tokenizer(format!(
                        "tokenizer.ggml.token_type has {} entries for {n_vocab} tokens",
                        arr.len()
                    )));
                }
                arr.iter()
                    .map(|t| {
                        value_to_i64(t)
                            .map(|t| Kind::from_gguf(t as i32))
                            .ok_or_else(|| {
                                Error::Tokenizer("tokenizer.ggml.token_type: not integers".into())
                            })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let pre = meta_string(content, "tokenizer.ggml.pre")?.unwrap_or_else(|| {
            tracing::warn!("the GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default'");
            "default".to_string()
        });
        let spec = pre_tokenizer_spec(&pre)?;

        let mut ids = SpecialIds {
            bos: meta_id(content, "tokenizer.ggml.bos_token_id", n_vocab),
            eos: meta_id(content, "tokenizer.ggml.eos_token_id", n_vocab),
            eot: meta_id(content, "tokenizer.ggml.eot_token_id", n_vocab),
            eom: meta_id(content, "tokenizer.ggml.eom_token_id", n_vocab),
            pad: meta_id(content, "tokenizer.ggml.padding_token_id", n_vocab),
            unk: meta_id(content, "tokenizer.ggml.unknown_token_id", n_vocab),
            add_bos: meta_bool(content, "tokenizer.ggml.add_bos_token")
                .unwrap_or(spec.default_add_bos),
            add_eos: meta_bool(content, "tokenizer.ggml.add_eos_token").unwrap_or(false),
            extra_eog: Vec::new(),
        };

        // llama.cpp: a token whose text names an end of turn becomes control and end of
        // generation, whatever its type says.
        let mut token_index: HashMap<&str, u32> = HashMap::with_capacity(n_vocab);
        for (i, t) in tokens.iter().enumerate() {
            token_index.insert(t.as_str(), i as u32);
        }
        if ids.eot.is_none() {
            ids.eot = EOT_TOKEN_TEXTS
                .iter()
                .find_map(|t| token_index.get(t).copied());
        }
        for text in EOG_TOKEN_TEXTS {
            if let Some(&id) = token_index.get(text) {
                if kinds[id as usize] != Kind::Control {
                    tracing::debug!(
                        "token {id} {text:?} names an end of turn; made a control token"
                    );
                    kinds[id as usize] = Kind::Control;
                }
                ids.extra_eog.push(id);
            }
        }
        drop(token_index);

        // The BPE model over the whole vocabulary. A merge whose parts or result are not tokens
        // is dropped (llama.cpp would fall back to bytes for such a result; `tokenizers` refuses).
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merge_pairs: Vec<(String, String)> = Vec::with_capacity(merges.len());
        let mut dropped = 0usize;
        for m in &merges {
            // llama.cpp splits at the first space after the first character.
            let split_at = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            let Some(at) = split_at else {
                return Err(Error::Tokenizer(format!("malformed merge {m:?}")));
            };
            let (a, b) = (&m[..at], &m[at + 1..]);
            if vocab.contains_key(a)
                && vocab.contains_key(b)
                && vocab.contains_key(&format!("{a}{b}"))
            {
                merge_pairs.push((a.to_string(), b.to_string()));
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!("{dropped} BPE merges name strings that are not tokens; dropped");
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build the BPE model: {e}")))?;
        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(build_pre_tokenizer(&spec.regexes)?));
        hf.with_decoder(Some(ByteLevel::default()));

        // Control and unknown tokens are special added tokens; user-defined ones plain added
        // tokens (matched in text even without parse_special).
        let mut special_added = Vec::new();
        let mut plain_added = Vec::new();
        for (t, k) in tokens.iter().zip(&kinds) {
            if t.is_empty() {
                continue;
            }
            match k {
                Kind::Control | Kind::Unknown => {
                    special_added.push(AddedToken::from(t.clone(), true))
                }
                Kind::UserDefined => plain_added.push(AddedToken::from(t.clone(), false)),
                _ => {}
            }
        }
        hf.add_special_tokens(special_added)
            .map_err(|e| Error::Tokenizer(format!("cannot add special tokens: {e}")))?;
        hf.add_tokens(plain_added)
            .map_err(|e| Error::Tokenizer(format!("cannot add user-defined tokens: {e}")))?;

        // What each token decodes to (llama.cpp's token_to_piece for BPE vocabularies).
        let b2u = bytes_to_unicode();
        let char_to_byte: HashMap<char, u8> =
            b2u.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let token_bytes: Vec<Box<[u8]>> = tokens
            .iter()
            .zip(&kinds)
            .map(|(t, k)| match k {
                Kind::Normal => byte_level_decode(t, &char_to_byte).into_boxed_slice(),
                Kind::Control | Kind::Unknown | Kind::UserDefined => {
                    t.as_bytes().to_vec().into_boxed_slice()
                }
                Kind::Unused => Box::default(),
            })
            .collect();

        Self::assemble(hf, tokens, token_bytes, kinds, ids, model, pre)
    }
}
