//! pd-generate's machine-readable mode: `--prompt-ids ... --temperature 0 --json` prints one JSON
//! object with the generated ids and text; bad options exit with a clear message.

use std::process::Command;

fn pd_generate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pd-generate"))
}

#[test]
fn json_mode_prints_generated_ids_and_text() {
    // "What is the capital of France?" rendered with the chat template (see tests/data).
    let ids = "1,9690,198,2683,359,253,5356,5646,11173,3365,3511,308,34519,28,7018,411,407,19712,8182,2,198,1,4093,198,1780,314,260,3575,282,4649,47,19842,281,582,6330,30,2,198,1,520,9531,198";
    let out = pd_generate()
        .args([
            "--prompt-ids",
            ids,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let generated: Vec<u64> = json["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(generated, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(json["generated_text"], "The capital of France is Paris.");
    assert_eq!(json["finish_reason"], "stop");
    assert_eq!(json["prompt_tokens"], 42);
}

#[test]
fn speculative_json_reports_drafted_and_accepted_tokens() {
    let text = "Repeat this text exactly, word for word:\n\nTo install the package, open a \
                terminal, change into the project folder and run the build script.";
    let run = |speculative: Option<&str>| {
        let mut cmd = pd_generate();
        cmd.args([
            "--prompt",
            text,
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--json",
        ]);
        if let Some(config) = speculative {
            cmd.args(["--speculative-config", config]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let plain = run(None);
    assert!(plain.get("speculative").is_none(), "{plain}");
    let spec = run(Some(
        r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}"#,
    ));
    assert_eq!(spec["generated_ids"], plain["generated_ids"]);
    let (drafted, accepted) = (
        spec["speculative"]["drafted"].as_u64().unwrap(),
        spec["speculative"]["accepted"].as_u64().unwrap(),
    );
    assert!(accepted > 0 && accepted <= drafted, "{spec}");

    // A bad configuration is a clear error.
    let out = pd_generate()
        .args([
            "--prompt-ids",
            "1,2,3",
            "--speculative-config",
            r#"{"method": "ngram"}"#,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("num_speculative_tokens"), "{stderr}");
}

#[test]
fn chat_prompt_streams_text_and_reports_speed() {
    let out = pd_generate()
        .args([
            "--prompt",
            "What is the capital of France? Answer in one sentence.",
            "--max-tokens",
            "16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn bad_values_exit_with_a_message_not_a_panic() {
    for args in [
        vec!["--prompt-ids", "1,2,3", "--temperature", "-1"],
        vec!["--prompt-ids", "1,999999"],
        vec!["--prompt", "hi", "--model", "/nonexistent/model.gguf"],
    ] {
        let out = pd_generate().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn prompts_file_runs_every_prompt_and_messages_take_a_system_turn() {
    let dir = std::env::temp_dir().join(format!("pd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.txt");
    std::fs::write(
        &file,
        "What is the capital of France? Answer in one sentence.\n\nName a color.\nCount to three.\n",
    )
    .unwrap();
    let out = pd_generate()
        .arg("--prompts-file")
        .arg(&file)
        .args(["--max-tokens", "8", "--temperature", "0", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one result per non-empty line");
    // Run together, the first prompt still gives what it gives alone.
    assert_eq!(
        lines[0]["generated_text"],
        "The capital of France is Paris."
    );
    for l in &lines {
        assert!(l["completion_tokens"].as_u64().unwrap() >= 1);
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let messages = r#"[{"role":"system","content":"You answer in French."},{"role":"user","content":"Hello"}]"#;
    let with_system = pd_generate()
        .args([
            "--messages",
            messages,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(with_system.status.success());
    let json: serde_json::Value = serde_json::from_slice(&with_system.stdout).unwrap();
    // The default system turn of the template is 20 tokens; this one is shorter.
    let default_system = pd_generate()
        .args([
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    let default_json: serde_json::Value = serde_json::from_slice(&default_system.stdout).unwrap();
    assert_ne!(json["prompt_tokens"], default_json["prompt_tokens"]);

    let bad = pd_generate()
        .args(["--messages", "not json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--messages"));
}
