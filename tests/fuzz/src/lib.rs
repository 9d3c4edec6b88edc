//! What the fuzz targets share: the real model's text side (tokenizer, chat template,
//! configuration), read once from its GGUF file, and a splitter of one input into several.

use std::sync::OnceLock;

use pd_common::model::{self, ModelSource, ModelText};

/// The model's configuration, tokenizer and chat template, read once.
pub fn model_text() -> &'static ModelText {
    static TEXT: OnceLock<ModelText> = OnceLock::new();
    TEXT.get_or_init(load_model_text)
}

/// The same, read from `PD_MODEL` or the default model path (deploy/fetch-model.sh puts it
/// there).
pub fn load_model_text() -> ModelText {
    let path = std::env::var_os("PD_MODEL")
        .map(Into::into)
        .unwrap_or_else(model::default_model_path);
    model::load_text(&ModelSource::Gguf(path))
        .unwrap_or_else(|e| panic!("the fuzz targets need the model: {e}"))
}

/// Cuts `data` into records, each a little-endian u16 length and that many bytes (the last
/// one takes what is left).
pub fn records(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        let rest = &data[2..];
        let take = len.min(rest.len());
        out.push(&rest[..take]);
        data = &rest[take..];
    }
    out
}

/// The inverse of [`records`], for seeds.
pub fn join_records(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}
