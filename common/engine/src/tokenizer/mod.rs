//! The tokenizer, built from the model file itself.
//!
//! [`Tokenizer::from_gguf`] reads the vocabulary, merges, token types, pre-tokenizer name and
//! special ids from the GGUF metadata (`tokenizer.ggml.*`) and reproduces llama.cpp's tokenization
//! of byte-level BPE (`tokenizer.ggml.model = "gpt2"`) models: the text is first split on special
//! tokens (control and user-defined tokens), each remaining fragment is split by the pre-tokenizer
//! regexes that llama.cpp uses for `tokenizer.ggml.pre` (applied in sequence, each to the pieces of
//! the one before), mapped to the GPT-2 byte alphabet, and merged by BPE rank. The BPE itself and
//! the pre-tokenization run in the `tokenizers` crate.
//!
//! Decoding does not go through `tokenizers`: every token is mapped once, at load, to the raw bytes
//! it stands for (llama.cpp's `token_to_piece`), so that decoding and streaming ([`IncrementalDecoder`])
//! are a concatenation of byte strings and agree with each other exactly.
//!
//! The module is split by concern: `pretokenize` holds the per-`tokenizer.ggml.pre` regex tables
//! and builds the pre-tokenizer, `gguf` builds a [`Tokenizer`] from GGUF metadata,
//! `tokenizer_json` from a Hugging Face `tokenizer.json`, and `decode` has the byte tables,
//! [`Tokenizer::decode`] and [`IncrementalDecoder`]. This file holds the [`Tokenizer`] type, its
//! encoding and its accessors.

mod decode;
mod gguf;
mod pretokenize;
#[cfg(test)]
mod tests;
mod tokenizer_json;

use std::collections::HashSet;

use crate::error::{Error, Result};

pub use decode::IncrementalDecoder;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// What a token is, as decoding and special-token parsing need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An ordinary BPE token, written in the GPT-2 byte alphabet.
    Normal,
    /// A control token (`<|im_start|>`): parsed from text only with `parse_special`, skipped by
    /// `decode(.., skip_special = true)`.
    Control,
    /// The unknown token; treated like a control token.
    Unknown,
    /// A user-defined token: always parsed from text, always decoded, as its literal text.
    UserDefined,
    /// Unused or otherwise unsupported: decodes to nothing (as in llama.cpp).
    Unused,
}

impl Kind {
    fn from_gguf(t: i32) -> Self {
        match t {
            token_type::UNDEFINED | token_type::NORMAL => Kind::Normal,
            token_type::UNKNOWN => Kind::Unknown,
            token_type::CONTROL => Kind::Control,
            token_type::USER_DEFINED => Kind::UserDefined,
            token_type::UNUSED | token_type::BYTE => Kind::Unused,
            _ => Kind::Unused,
        }
    }

    fn is_special(self) -> bool {
        matches!(self, Kind::Control | Kind::Unknown)
    }
}

/// Token texts that llama.cpp treats as end of generation when they exist in the vocabulary
/// (`llama_vocab::impl::load`, the `special_eog_ids` scan).
const EOG_TOKEN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
];

/// Token texts llama.cpp looks for when the GGUF has no `eot_token_id`.
const EOT_TOKEN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// A tokenizer read from the model file (or a Hugging Face `tokenizer.json`).
///
/// `Send + Sync`; share it behind an `Arc`.
pub struct Tokenizer {
    /// Recognises special (control) tokens in text.
    hf: tokenizers::Tokenizer,
    /// Treats special (control) tokens in text as plain text; user-defined tokens are still
    /// recognised, as llama.cpp does with `parse_special = false`.
    hf_plain: tokenizers::Tokenizer,
    /// The token strings, by id, as in the vocabulary (byte-level alphabet for BPE tokens).
    tokens: Vec<String>,
    /// The raw bytes each token decodes to.
    token_bytes: Vec<Box<[u8]>>,
    kinds: Vec<Kind>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    /// `tokenizer.ggml.model`, or "tokenizer.json".
    model: String,
    /// `tokenizer.ggml.pre`, or "tokenizer.json".
    pre: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// Ids and flags that a tokenizer source provides besides the vocabulary.
#[derive(Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// More end-of-generation ids (e.g. from generation_config.json).
    extra_eog: Vec<u32>,
}

impl Tokenizer {
    fn assemble(
        hf: tokenizers::Tokenizer,
        tokens: Vec<String>,
        token_bytes: Vec<Box<[u8]>>,
        kinds: Vec<Kind>,
        ids: SpecialIds,
        model: String,
        pre: String,
    ) -> Result<Self> {
        let mut hf_plain = hf.clone();
        hf_plain.set_encode_special_tokens(true);

        let mut eog: Vec<u32> = [ids.eos, ids.eot, ids.eom]
            .into_iter()
            .flatten()
            .chain(ids.extra_eog.iter().copied())
            .collect();
        let mut seen = HashSet::new();
        eog.retain(|id| seen.insert(*id));
        eog.sort_unstable();

        if ids.add_bos && ids.bos.is_none() {
            return Err(Error::Tokenizer(
                "add_bos_token is set, but there is no BOS token id".into(),
            ));
        }
        if ids.add_eos && ids.eos.is_none() {
            return Err(Error::Tokenizer(
                "add_eos_token is set, but there is no EOS token id".into(),
            ));
        }

        Ok(Self {
            hf,
            hf_plain,
            tokens,
            token_bytes,
            kinds,
            bos: ids.bos,
            eos: ids.eos,
            eot: ids.eot,
            eom: ids.eom,
            pad: ids.pad,
            unk: ids.unk,
            add_bos: ids.add_bos,
            add_eos: ids.add_eos,
            eog,
            model,
            pre,
        })
    }

    /// Tokenizes `text`, adding BOS/EOS where the model asks for them (`add_bos_token`,
    /// `add_eos_token`). With `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) become their ids; without it they are tokenized as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, true, parse_special)
    }

    /// [`Tokenizer::encode`] with control over BOS/EOS: `add_special = false` adds neither
    /// (llama.cpp's `add_special`).
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let hf = if parse_special {
            &self.hf
        } else {
            &self.hf_plain
        };
        let enc = hf
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize: {e}")))?;
        let body = enc.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(body);
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Number of token ids (every id below it is valid).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token, by its vocabulary string (byte-level form for BPE tokens, e.g. "Ġthe").
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// The vocabulary string of a token (byte-level form for BPE tokens).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn id (`tokenizer.ggml.eot_token_id`, or found by name as llama.cpp does).
    pub fn eot_token_id(&self) -> Option<u32> {
        self.eot
    }

    pub fn eom_token_id(&self) -> Option<u32> {
        self.eom
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad
    }

    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether [`Tokenizer::encode`] adds BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`Tokenizer::encode`] adds EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Every end-of-generation id, sorted: eos, eot, eom, and the control tokens llama.cpp
    /// recognises by name (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...). The default stop ids.
    pub fn eog_token_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control (or unknown) token: parsed from text only with
    /// `parse_special`, skipped by `decode(.., skip_special = true)`. False out of range.
    pub fn is_special(&self, id: u32) -> bool {
        self.kinds.get(id as usize).is_some_and(|k| k.is_special())
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.map(|id| self.tokens[id as usize].as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.map(|id| self.tokens[id as usize].as_str())
    }

    /// `tokenizer.ggml.model` ("gpt2"), or "tokenizer.json".
    pub fn model_type(&self) -> &str {
        &self.model
    }

    /// `tokenizer.ggml.pre`, or "tokenizer.json".
    pub fn pre_type(&self) -> &str {
        &self.pre
    }
}
