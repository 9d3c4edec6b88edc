//! Bad input gets a precise error, never a panic: empty and over-long prompts, missing, truncated
//! and non-GGUF model files, out-of-range sampling values, unknown token ids.

use std::io::Write;

use candle_core::Device;
use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest};
use pd_common::model::{self, ModelSource};
use pd_common::sampling::SamplingParams;
use pd_engine::{Error, ErrorKind};
use pd_tests::{real_engine, real_model};

fn engine() -> EngineCore {
    real_engine(EngineConfig::default())
}

fn submit(
    core: &mut EngineCore,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
) -> pd_engine::Result<u64> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(
        GenerateRequest {
            prompt_ids,
            params,
            ..Default::default()
        },
        tx,
    )
}

#[test]
fn empty_prompt_is_invalid() {
    let err = submit(&mut engine(), vec![], SamplingParams::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let mut core = engine();
    let context = core.max_model_len();
    let err = submit(&mut core, vec![42; context + 1], SamplingParams::default()).unwrap_err();
    assert!(matches!(err, Error::PromptTooLong { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    // Fits alone, but not with the requested output.
    let params = SamplingParams {
        max_tokens: 100,
        ..SamplingParams::default()
    };
    let err = submit(&mut core, vec![42; context - 50], params).unwrap_err();
    assert!(err.to_string().contains(&context.to_string()), "{err}");
    assert!(!core.has_work(), "refused requests leave nothing queued");
}

#[test]
fn unknown_token_ids_are_invalid() {
    let mut core = engine();
    let vocab = real_model().model.config().vocab_size as u32;
    let err = submit(&mut core, vec![1, vocab], SamplingParams::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains(&vocab.to_string()), "{err}");
    let params = SamplingParams {
        stop_token_ids: vec![vocab + 7],
        ..SamplingParams::default()
    };
    assert_eq!(
        submit(&mut core, vec![1, 2], params).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let tok = real_model().tokenizer.as_ref().unwrap();
    assert!(tok.decode(&[vocab + 1], true).is_err());
}

#[test]
fn out_of_range_sampling_values_are_invalid_and_name_the_field() {
    let mut core = engine();
    let d = SamplingParams::default;
    let cases: Vec<(&str, SamplingParams)> = vec![
        (
            "temperature",
            SamplingParams {
                temperature: -0.5,
                ..d()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::NAN,
                ..d()
            },
        ),
        ("top_p", SamplingParams { top_p: 0.0, ..d() }),
        ("top_p", SamplingParams { top_p: 1.5, ..d() }),
        ("min_p", SamplingParams { min_p: -0.1, ..d() }),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 0.0,
                ..d()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.5,
                ..d()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: -3.0,
                ..d()
            },
        ),
        (
            "max_tokens",
            SamplingParams {
                max_tokens: 0,
                ..d()
            },
        ),
        (
            "logprobs",
            SamplingParams {
                logprobs: Some(21),
                ..d()
            },
        ),
        (
            "stop",
            SamplingParams {
                stop: vec![String::new()],
                ..d()
            },
        ),
    ];
    for (field, params) in cases {
        let err = submit(&mut core, vec![1, 2, 3], params).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{field}: {err}");
        assert!(
            err.to_string().contains(field),
            "error for {field} does not name it: {err}"
        );
    }
    assert!(!core.has_work());
}

#[test]
fn missing_truncated_and_foreign_model_files_are_errors() {
    let dir = std::env::temp_dir().join(format!("pd-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |p: &std::path::Path| {
        model::load(&ModelSource::Gguf(p.to_path_buf()), &Device::Cpu).map(|_| ())
    };

    let missing = load(&dir.join("nope.gguf")).unwrap_err();
    assert!(matches!(missing, Error::ModelNotFound(_)), "{missing}");
    assert_eq!(missing.kind(), ErrorKind::NotFound);

    let foreign = dir.join("foreign.gguf");
    std::fs::write(&foreign, b"this is not a GGUF file at all, just text\n").unwrap();
    let err = load(&foreign).unwrap_err();
    assert!(matches!(err, Error::ModelLoad { .. }), "{err}");

    // The real file cut at 1 MiB (header intact, tensor data missing) and at 100 bytes.
    let real = std::fs::read(model::default_model_path()).unwrap();
    for cut in [1 << 20, 100] {
        let truncated = dir.join(format!("truncated-{cut}.gguf"));
        std::fs::File::create(&truncated)
            .unwrap()
            .write_all(&real[..cut])
            .unwrap();
        let err = load(&truncated).unwrap_err();
        assert!(
            matches!(err, Error::ModelLoad { .. }),
            "cut at {cut}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_dummy_shape_is_an_error() {
    let err = "dummy:gpt-17".parse::<ModelSource>().unwrap_err();
    assert!(
        err.to_string().contains("llama3-8b"),
        "lists the known shapes: {err}"
    );
}
