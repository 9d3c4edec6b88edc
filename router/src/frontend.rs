//! What both client APIs share before a request enters the cluster: the served model's name,
//! the chat template, tokenization and validation. A request that passes here is well formed;
//! the decode node still checks it against its own cache.

use std::sync::Arc;

use pd_common::chat_template::ChatMessage;
use pd_common::model::ModelText;
use pd_common::sampling::SamplingParams;
use pd_common::telemetry::new_request_id;
use pd_common::tokenizer::Tokenizer;
use pd_common::{EngineError, Error, Result};

use crate::dispatch::Job;
use crate::pool::Pool;

pub struct Frontend {
    model_name: String,
    text: ModelText,
    /// The cluster, whose decode nodes may take less than the model's context; `None` checks
    /// requests against the model alone (the fuzz targets).
    pool: Option<Arc<Pool>>,
}

impl Frontend {
    pub fn new(model_name: String, text: ModelText, pool: Option<Arc<Pool>>) -> Arc<Self> {
        Arc::new(Self {
            model_name,
            text,
            pool,
        })
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Longest prompt plus output the cluster takes: the model's context, or less where the
    /// decode nodes' KV caches hold less.
    pub fn max_model_len(&self) -> usize {
        let model = self.text.config.max_position_embeddings;
        let cluster = self.pool.as_ref().and_then(|p| p.max_model_len());
        cluster.map_or(model, |n| n.min(model))
    }

    pub fn tokenizer(&self) -> Result<&Arc<Tokenizer>> {
        self.text
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no tokenizer: send token ids"))
    }

    /// Fails unless `requested` names the served model (empty selects it).
    pub fn check_model(&self, requested: &str) -> Result<()> {
        if requested.is_empty() || requested == self.model_name {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "the model `{requested}` does not exist; this cluster serves `{}`",
                self.model_name
            )))
        }
    }

    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer()?.encode(text, true)?)
    }

    /// Renders `messages` with the chat template, ready for the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .text
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no chat template"))?;
        Ok(template.render(messages, true)?)
    }

    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        self.encode_text(&text)
    }

    /// Checks a tokenized request and fixes its seed; `max_tokens: None` means "up to the
    /// context".
    pub fn job(
        &self,
        request_id: Option<String>,
        prompt_ids: Vec<u32>,
        mut params: SamplingParams,
        max_tokens: Option<u32>,
    ) -> Result<Job> {
        let context = self.max_model_len();
        if prompt_ids.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if prompt_ids.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                max_tokens: max_tokens.unwrap_or(1) as usize,
                context,
            }
            .into());
        }
        params.max_tokens = match max_tokens {
            Some(n) => n,
            None => (context - prompt_ids.len()) as u32,
        };
        let vocab = self.text.config.vocab_size;
        if let Some(id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "prompt token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        params.validate(vocab)?;
        if prompt_ids.len() + params.max_tokens as usize > context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                max_tokens: params.max_tokens as usize,
                context,
            }
            .into());
        }
        params.seed = params.seed.or_else(|| Some(rand::random()));
        Ok(Job {
            request_id: request_id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(new_request_id),
            prompt_ids,
            params,
            arrived: std::time::Instant::now(),
            decode_node: None,
        })
    }
}
