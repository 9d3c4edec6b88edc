//! Entry points of the fuzz targets (`tests/fuzz`): what a request goes through at the client
//! edge before any node sees it (JSON or protobuf decoding, the OpenAI and gRPC checks, the chat
//! template, tokenization, sampling validation), with the model's own tokenizer and template and
//! no cluster behind. Not an API: the fuzz targets are its only callers.

use std::sync::Arc;

use pd_common::model::ModelText;
use pd_proto::v1 as pb;
use prost::Message;

use crate::frontend::Frontend;
use crate::http::{completions, openai, parse_json};

pub struct EdgeChecks {
    frontend: Arc<Frontend>,
}

impl EdgeChecks {
    pub fn new(text: ModelText) -> Self {
        Self {
            frontend: Frontend::new("model".into(), text, None),
        }
    }

    /// The jobs `/v1/completions` would start for `body`, or why it would refuse it.
    pub fn completion(&self, body: &[u8]) -> Result<usize, String> {
        let req: openai::CompletionRequest = parse_json(body).map_err(|e| format!("{e:?}"))?;
        let plan = completions::plan_completion_request(&self.frontend, &req)
            .map_err(|e| format!("{e:?}"))?;
        Ok(plan.jobs.len())
    }

    /// The same for `/v1/chat/completions`.
    pub fn chat(&self, body: &[u8]) -> Result<usize, String> {
        let req: openai::ChatRequest = parse_json(body).map_err(|e| format!("{e:?}"))?;
        let plan =
            completions::plan_chat_request(&self.frontend, &req).map_err(|e| format!("{e:?}"))?;
        Ok(plan.jobs.len())
    }

    /// The prompt length of the job `Generation.Generate` would start for `message` (protobuf
    /// bytes), or why it would refuse it.
    pub fn generate(&self, message: &[u8]) -> Result<usize, String> {
        let request = pb::GenerateRequest::decode(message).map_err(|e| e.to_string())?;
        let job = crate::grpc::generate_job(&self.frontend, tonic::Request::new(request))
            .map_err(|e| e.to_string())?;
        Ok(job.prompt_ids.len())
    }
}
