//! Decoding: the byte tables that map token texts to the raw bytes they stand for (GPT-2 byte
//! alphabet, SentencePiece `▁` and `<0xAB>` tokens), [`Tokenizer::decode`] over those bytes, and
//! [`IncrementalDecoder`], which streams the same text piece by piece without splitting a UTF-8
//! character.

use std::collections::HashMap;

use super::Tokenizer;
use crate::error::{Error, Result};

/// The GPT-2 byte-to-unicode table: byte `b` is written as `table[b]` in byte-level vocabularies.
pub(super) fn bytes_to_unicode() -> [char; 256] {
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
pub(super) fn byte_level_decode(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
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
pub(super) fn sentencepiece_decode(text: &str) -> Vec<u8> {
    if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&text[3..5], 16) {
            return vec![b];
        }
    }
    text.replace('\u{2581}', " ").into_bytes()
}

impl Tokenizer {
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
