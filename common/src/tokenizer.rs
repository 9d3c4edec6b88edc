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

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

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

// Pre-tokenizer regexes, as llama.cpp writes them in `llm_tokenizer_bpe` (src/llama-vocab.cpp).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes (and a few defaults it sets) for one `tokenizer.ggml.pre` value.
struct PreTokenizerSpec {
    /// Applied in order; each splits the pieces left by the previous one (matches and the text
    /// between matches both become pieces).
    regexes: Vec<&'static str>,
    /// A piece that is itself a token is taken whole, without running the merges.
    ignore_merges: bool,
    /// Whether BOS is added when the GGUF does not say (`tokenizer.ggml.add_bos_token` missing).
    default_add_bos: bool,
}

fn pre_tokenizer_spec(pre: &str) -> Result<PreTokenizerSpec> {
    let spec = |regexes: Vec<&'static str>, ignore_merges: bool, default_add_bos: bool| {
        Ok(PreTokenizerSpec {
            regexes,
            ignore_merges,
            default_add_bos,
        })
    };
    match pre {
        "default" => spec(
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => spec(vec![RE_LLAMA3], true, true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => spec(vec![RE_LLAMA3], false, false),
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de"
        | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" => {
            spec(vec![RE_GPT2], false, false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(vec![r"\p{N}", RE_GPT2], false, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" | "hunyuan" => {
            spec(vec![RE_QWEN2], false, false)
        }
        "falcon" => spec(
            vec![r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "gpt-4o" => spec(vec![RE_GPT4O], false, false),
        "tekken" => spec(vec![RE_TEKKEN], true, true),
        other => Err(Error::Tokenizer(format!(
            "unsupported pre-tokenizer type tokenizer.ggml.pre = {other:?}"
        ))),
    }
}

fn build_pre_tokenizer(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    // The byte-level step only maps the pieces to the GPT-2 byte alphabet: the splitting is done.
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

/// The GPT-2 byte-to-unicode table: byte `b` is written as `table[b]` in byte-level vocabularies.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

/// Maps a byte-level token text back to the bytes it stands for. Characters outside the byte
/// alphabet (which a well-formed vocabulary does not have) are kept as their UTF-8.
fn byte_level_decode(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Decodes a SentencePiece-style token text (`▁` for space, `<0xAB>` byte tokens).
fn sentencepiece_decode(text: &str) -> Vec<u8> {
    if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&text[3..5], 16) {
            return vec![b];
        }
    }
    text.replace('\u{2581}', " ").into_bytes()
}

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

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.tokens.len() {
            Ok(())
        } else {
            Err(Error::InvalidRequest(format!(
                "token id {id} is out of range (vocabulary size {})",
                self.tokens.len()
            )))
        }
    }

    /// The raw bytes of one token (what it contributes to decoded text). Errors for an id out of
    /// range.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.check_id(id)?;
        Ok(&self.token_bytes[id as usize])
    }

    /// Decodes ids to text: the tokens' bytes concatenated, then read as UTF-8 (invalid
    /// sequences become U+FFFD). With `skip_special`, control tokens are left out. An id
    /// outside the vocabulary is an [`Error::InvalidRequest`].
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.check_id(id)?;
            if skip_special && self.kinds[id as usize].is_special() {
                continue;
            }
            bytes.extend_from_slice(&self.token_bytes[id as usize]);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
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

/// Turns a growing list of token ids into text pieces, never splitting a multi-byte UTF-8
/// character.
///
/// Works on the tokens' raw bytes: each push appends one token's bytes and returns the longest
/// prefix of what is held that is complete UTF-8 (invalid sequences become U+FFFD, as in
/// [`Tokenizer::decode`]); an incomplete tail of at most 3 bytes is held back. The pieces of all
/// pushes plus [`IncrementalDecoder::flush`] are exactly `decode(all ids)`.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Pushes one id; returns the new text that became complete (possibly empty while a UTF-8
    /// character is incomplete). An id out of range is an error and changes nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        let bytes = tokenizer.token_bytes(id)?;
        if self.skip_special && tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Cannot fail: the bytes up to valid_up_to() are valid UTF-8.
                    out.push_str(std::str::from_utf8(&self.pending[start..start + valid]).unwrap());
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += valid + n;
                        }
                        None => {
                            // An incomplete character at the end: hold it back.
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Text still held back at the end (an incomplete UTF-8 tail, decoded lossily).
    pub fn flush(&mut self, _tokenizer: &Tokenizer) -> Result<String> {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok(out)
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    const MODEL_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    const GOLDEN_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/smollm2_q4_1_greedy.jsonl"
    );

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        prompt: String,
        prompt_ids: Vec<u32>,
        generated_ids: Vec<u32>,
        generated_text: String,
    }

    fn tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let mut file = std::fs::File::open(MODEL_PATH).unwrap_or_else(|e| {
                panic!("cannot open {MODEL_PATH}: {e}; run deploy/fetch-model.sh to download the model")
            });
            let content = gguf_file::Content::read(&mut file).expect("read GGUF");
            Tokenizer::from_gguf(&content).expect("tokenizer from GGUF")
        })
    }

    fn cases() -> Vec<Case> {
        let text = std::fs::read_to_string(GOLDEN_PATH)
            .unwrap_or_else(|e| panic!("cannot read {GOLDEN_PATH}: {e}"));
        let cases: Vec<Case> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("golden case"))
            .collect();
        assert_eq!(cases.len(), 10, "expected the 10 golden cases");
        cases
    }

    /// The generated ids without the final end-of-generation token.
    fn generated_body<'a>(tok: &Tokenizer, case: &'a Case) -> &'a [u32] {
        match case.generated_ids.split_last() {
            Some((last, rest)) if tok.is_eog(*last) => rest,
            _ => &case.generated_ids,
        }
    }

    #[test]
    fn tokenizer_metadata() {
        let tok = tokenizer();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.model_type(), "gpt2");
        assert_eq!(tok.pre_type(), "smollm");
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert!(!tok.add_bos());
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
        assert_eq!(tok.id_to_token(49152), None);
        assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
        assert!(!tok.is_special(38634));
        assert!(!tok.is_special(u32::MAX));
    }

    #[test]
    fn tokenizer_eog_ids() {
        let tok = tokenizer();
        let eog = tok.eog_token_ids();
        assert!(eog.contains(&0), "eog {eog:?} lacks <|endoftext|>");
        assert!(eog.contains(&2), "eog {eog:?} lacks <|im_end|>");
        assert!(!eog.contains(&1), "eog {eog:?} has <|im_start|>");
        assert!(tok.is_eog(0) && tok.is_eog(2) && !tok.is_eog(1));
    }

    #[test]
    fn tokenizer_golden_prompt_ids() {
        let tok = tokenizer();
        let mut failures = Vec::new();
        for case in cases() {
            let ids = tok.encode(&case.prompt, true).unwrap();
            if ids != case.prompt_ids {
                let first_diff = ids
                    .iter()
                    .zip(&case.prompt_ids)
                    .position(|(a, b)| a != b)
                    .unwrap_or(ids.len().min(case.prompt_ids.len()));
                failures.push(format!(
                    "{}: {} ids vs {} expected, first difference at {first_diff}: ours {:?} golden {:?}",
                    case.name,
                    ids.len(),
                    case.prompt_ids.len(),
                    &ids[first_diff..(first_diff + 5).min(ids.len())],
                    &case.prompt_ids[first_diff..(first_diff + 5).min(case.prompt_ids.len())],
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "tokenization mismatches:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn tokenizer_golden_roundtrip_prompt() {
        let tok = tokenizer();
        for case in cases() {
            assert_eq!(
                tok.decode(&case.prompt_ids, false).unwrap(),
                case.prompt,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn tokenizer_golden_decode_generated() {
        let tok = tokenizer();
        for case in cases() {
            let body = generated_body(tok, &case);
            assert_eq!(
                tok.decode(body, false).unwrap(),
                case.generated_text,
                "{}",
                case.name
            );
            assert_eq!(
                tok.decode(&case.generated_ids, true).unwrap(),
                case.generated_text,
                "{} (skip_special)",
                case.name
            );
        }
    }

    #[test]
    fn tokenizer_incremental_decoder_golden() {
        let tok = tokenizer();
        for case in cases() {
            let body = generated_body(tok, &case);
            let mut dec = IncrementalDecoder::new(true);
            let mut text = String::new();
            let mut held_back = 0;
            for &id in body {
                let piece = dec.push(tok, id).unwrap();
                if dec.has_pending() {
                    held_back += 1;
                }
                text.push_str(&piece);
            }
            assert!(
                !dec.has_pending(),
                "{}: text ends inside a character",
                case.name
            );
            text.push_str(&dec.flush(tok).unwrap());
            assert_eq!(text, case.generated_text, "{}", case.name);
            if case.name == "zh_instruction" {
                assert!(
                    held_back > 0,
                    "zh_instruction should split a character across tokens"
                );
            }
            // And with the final EOG token pushed, skipped as special.
            let mut dec = IncrementalDecoder::new(true);
            let mut text = String::new();
            for &id in &case.generated_ids {
                text.push_str(&dec.push(tok, id).unwrap());
            }
            text.push_str(&dec.flush(tok).unwrap());
            assert_eq!(text, case.generated_text, "{} (with eog)", case.name);
        }
    }

    #[test]
    fn tokenizer_incremental_decoder_matches_decode() {
        let tok = tokenizer();
        let samples = [
            "Hello, world! 12345",
            "长城是中国古代的军事防御工程。",
            "emoji: 😀👍🏽 and ünïcödé",
            "<|im_start|>user\nhi<|im_end|>",
        ];
        for s in samples {
            let ids = tok.encode(s, true).unwrap();
            for skip in [false, true] {
                let mut dec = IncrementalDecoder::new(skip);
                let mut text = String::new();
                for &id in &ids {
                    text.push_str(&dec.push(tok, id).unwrap());
                }
                text.push_str(&dec.flush(tok).unwrap());
                assert_eq!(text, tok.decode(&ids, skip).unwrap(), "{s:?} skip={skip}");
            }
            assert_eq!(tok.decode(&ids, false).unwrap(), s);
        }
        // Invalid and truncated UTF-8: the same replacement characters either way.
        let e4 = tok.token_to_id("ä").expect("byte token 0xE4"); // byte 0xE4 in the byte alphabet
        let a = tok.token_to_id("a").unwrap();
        for ids in [vec![e4, a], vec![a, e4], vec![e4, e4, a, e4]] {
            let mut dec = IncrementalDecoder::new(false);
            let mut text = String::new();
            for &id in &ids {
                text.push_str(&dec.push(tok, id).unwrap());
            }
            text.push_str(&dec.flush(tok).unwrap());
            assert_eq!(text, tok.decode(&ids, false).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn tokenizer_out_of_range_id_is_an_error() {
        let tok = tokenizer();
        let n = tok.vocab_size() as u32;
        for bad in [n, n + 1, u32::MAX] {
            assert!(matches!(
                tok.decode(&[1, bad], false),
                Err(Error::InvalidRequest(_))
            ));
            let mut dec = IncrementalDecoder::new(false);
            assert!(matches!(dec.push(tok, bad), Err(Error::InvalidRequest(_))));
            assert!(tok.token_bytes(bad).is_err());
        }
    }

    #[test]
    fn tokenizer_digits_split_individually() {
        let tok = tokenizer();
        let ids = tok.encode("12345", true).unwrap();
        assert_eq!(ids.len(), 5, "{ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), "12345");
        let ids = tok.encode("in 2024", true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), "in 2024");
        assert_eq!(ids.len(), 1 + 1 + 4, "{ids:?}"); // "in", " ", 4 digits
    }

    #[test]
    fn tokenizer_parse_special() {
        let tok = tokenizer();
        let text = "<|im_start|>user\nhi<|im_end|>";
        let with = tok.encode(text, true).unwrap();
        assert_eq!(with.first(), Some(&1));
        assert!(with.contains(&2));
        let without = tok.encode(text, false).unwrap();
        assert!(
            !without.contains(&1) && !without.contains(&2),
            "{without:?}"
        );
        assert_eq!(tok.decode(&without, false).unwrap(), text);
        assert_eq!(tok.decode(&with, true).unwrap(), "user\nhi");
        assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
        assert_eq!(tok.encode("Paris", true).unwrap(), vec![38634]);
    }

    #[test]
    fn tokenizer_rejects_unsupported_models() {
        let mut content = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: HashMap::new(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        content.metadata.insert(
            "tokenizer.ggml.model".into(),
            gguf_file::Value::String("llama".into()),
        );
        let err = Tokenizer::from_gguf(&content).unwrap_err();
        assert!(
            matches!(err, Error::Tokenizer(ref m) if m.contains("SentencePiece")),
            "{err}"
        );
    }

    /// The same vocabulary written as a Hugging Face tokenizer.json (+ tokenizer_config.json),
    /// read back through `from_tokenizer_json`, tokenizes the golden prompts the same way.
    #[test]
    fn tokenizer_from_tokenizer_json() {
        let tok = tokenizer();
        let dir = std::env::temp_dir().join(format!("pd-tokenizer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json_path = dir.join("tokenizer.json");
        tok.hf.save(&json_path, false).unwrap();
        let config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false,
            "chat_template": "{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}",
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let from_json = Tokenizer::from_tokenizer_json(&json_path).unwrap();
        assert_eq!(from_json.vocab_size(), tok.vocab_size());
        assert_eq!(from_json.bos_token_id(), Some(1));
        assert_eq!(from_json.eos_token_id(), Some(2));
        assert!(!from_json.add_bos());
        assert!(from_json.eog_token_ids().contains(&0) && from_json.eog_token_ids().contains(&2));
        for case in cases() {
            assert_eq!(
                from_json.encode(&case.prompt, true).unwrap(),
                case.prompt_ids,
                "{}",
                case.name
            );
            assert_eq!(
                from_json.decode(&case.generated_ids, true).unwrap(),
                case.generated_text,
                "{}",
                case.name
            );
        }
        let template = crate::chat_template::ChatTemplate::from_tokenizer_config(
            &dir.join("tokenizer_config.json"),
            &from_json,
        )
        .unwrap()
        .expect("a chat template");
        let msgs = [crate::chat_template::ChatMessage::new("user", "hi")];
        assert_eq!(template.render(&msgs, false).unwrap(), "user:hi<|im_end|>");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tokenizer_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<IncrementalDecoder>();
    }
}
