//! Pre-tokenization: the regexes llama.cpp splits text with for each `tokenizer.ggml.pre` value
//! ([`pre_tokenizer_spec`], with the defaults that go with them) and the `tokenizers`
//! pre-tokenizer built from them ([`build_pre_tokenizer`]): the regexes applied in sequence, then
//! the mapping to the GPT-2 byte alphabet.

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

// Pre-tokenizer regexes, as llama.cpp writes them in `llm_tokenizer_bpe` (src/llama-vocab.cpp).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes (and a few defaults it sets) for one `tokenizer.ggml.pre` value.
pub(super) struct PreTokenizerSpec {
    /// Applied in order; each splits the pieces left by the previous one (matches and the text
    /// between matches both become pieces).
    pub(super) regexes: Vec<&'static str>,
    /// A piece that is itself a token is taken whole, without running the merges.
    pub(super) ignore_merges: bool,
    /// Whether BOS is added when the GGUF does not say (`tokenizer.ggml.add_bos_token` missing).
    pub(super) default_add_bos: bool,
}

pub(super) fn pre_tokenizer_spec(pre: &str) -> Result<PreTokenizerSpec> {
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

pub(super) fn build_pre_tokenizer(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
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
