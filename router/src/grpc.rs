//! The client-facing gRPC API: `pd.v1.Generation` (plus `grpc.health.v1`, served beside it).

use std::pin::Pin;
use std::sync::Arc;

use pd_common::chat_template::ChatMessage;
use pd_common::sampling::SamplingParams;
use pd_common::telemetry::REQUEST_ID_HEADER;
use pd_common::wire::FromWire;
use pd_common::Error;
use pd_proto::v1 as pb;
use pd_proto::v1::generate_request::Prompt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::admission::{Admission, Caller};
use crate::dispatch::{Dispatcher, Job};
use crate::frontend::Frontend;
use crate::outcome;
use crate::pool::Pool;

#[derive(Clone)]
pub struct GenerationService {
    pub frontend: Arc<Frontend>,
    pub dispatcher: Arc<Dispatcher>,
    pub admission: Arc<Admission>,
    pub pool: Arc<Pool>,
}

impl GenerationService {
    /// Who sent `request`, from its `authorization` metadata (`Bearer <key>`).
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.admission.authenticate(authorization)
    }

    fn job(&self, request: Request<pb::GenerateRequest>) -> Result<Job, Error> {
        generate_job(&self.frontend, request)
    }
}

/// The job of a `Generate` call, checked and tokenized.
pub(crate) fn generate_job(
    frontend: &Frontend,
    request: Request<pb::GenerateRequest>,
) -> Result<Job, Error> {
    let header_id = request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let r = request.into_inner();
    frontend.check_model(&r.model)?;
    let prompt_ids = match &r.prompt {
        Some(Prompt::Text(text)) => frontend.encode_text(text)?,
        Some(Prompt::Chat(chat)) => frontend.encode_chat(&chat_messages(chat))?,
        Some(Prompt::TokenIds(ids)) => ids.ids.clone(),
        None => {
            return Err(Error::invalid(
                "a prompt is required: text, chat or token_ids",
            ))
        }
    };
    let wire = r.sampling.unwrap_or_default();
    let params = SamplingParams::from_wire(&wire);
    let max_tokens = match (wire.max_tokens, &r.prompt) {
        (Some(n), _) => Some(n),
        // Chats run to the end of the answer by default, as the HTTP chat API does.
        (None, Some(Prompt::Chat(_))) => None,
        (None, _) => Some(SamplingParams::default().max_tokens),
    };
    let request_id = Some(r.request_id).filter(|s| !s.is_empty()).or(header_id);
    frontend.job(request_id, prompt_ids, params, max_tokens)
}

type GenerateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

fn chat_messages(chat: &pb::Chat) -> Vec<ChatMessage> {
    chat.messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let admitted = self.caller(&request).and_then(|caller| {
            let job = self.job(request)?;
            let capacity = self.pool.decode_capacity();
            let admitted = self
                .admission
                .admit(caller, &[job.prompt_ids.len()], capacity)?;
            Ok((job, admitted))
        });
        let (job, admitted) = admitted.inspect_err(|e| outcome::rejected(outcome::reason_of(e)))?;
        let ticket = admitted
            .tickets
            .into_iter()
            .next()
            .expect("one ticket per job");
        let stream = self.dispatcher.start(job, ticket).await?.stream;
        let stream = ReceiverStream::new(stream).map(|m| m.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        self.frontend.check_model(&r.model)?;
        let (text, token_ids) = match &r.prompt {
            Some(pb::tokenize_request::Prompt::Text(text)) => {
                (text.clone(), self.frontend.encode_text(text)?)
            }
            Some(pb::tokenize_request::Prompt::Chat(chat)) => {
                let text = self.frontend.render_chat(&chat_messages(chat))?;
                let ids = self.frontend.encode_text(&text)?;
                (text, ids)
            }
            None => return Err(Error::invalid("a prompt is required: text or chat").into()),
        };
        Ok(Response::new(pb::TokenizeResponse { token_ids, text }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.caller(&request)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelCard {
                id: self.frontend.model_name().to_string(),
                max_model_len: self.frontend.max_model_len() as u32,
            }],
        }))
    }
}
