//! Templates rendered against the golden prompts and hostile or malformed messages.

use super::*;
use std::sync::OnceLock;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    template: bool,
    prompt: String,
}

fn model_template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let content = crate::test_data::model_gguf();
        let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
        ChatTemplate::from_gguf(&content, &tokenizer)
            .expect("compile the chat template")
            .expect("the GGUF has a chat template")
    })
}

fn render_one(source: &str, messages: &[ChatMessage]) -> Result<String> {
    ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))?.render(messages, false)
}

#[test]
fn chat_template_golden_prompts() {
    let template = model_template();
    let mut checked = 0;
    for line in crate::test_data::golden_lines() {
        let case: Case = serde_json::from_str(&line).unwrap();
        if !case.template {
            continue;
        }
        const OPEN: &str = "<|im_start|>user\n";
        let start = case.prompt.find(OPEN).expect("user turn") + OPEN.len();
        let len = case.prompt[start..]
            .find("<|im_end|>")
            .expect("end of user turn");
        let user = &case.prompt[start..start + len];
        let rendered = template
            .render(&[ChatMessage::new("user", user)], true)
            .unwrap();
        assert_eq!(rendered, case.prompt, "{}", case.name);
        checked += 1;
    }
    assert_eq!(checked, 8, "expected 8 templated golden cases");
}

#[test]
fn chat_template_explicit_system_replaces_default() {
    let template = model_template();
    let messages = [
        ChatMessage::new("system", "You are a pirate."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Arr."),
        ChatMessage::new("user", "Bye"),
    ];
    let rendered = template.render(&messages, true).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nArr.<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert!(!rendered.contains("SmolLM"));
    let no_prompt = template.render(&messages[..2], false).unwrap();
    assert!(
        no_prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n"),
        "{no_prompt:?}"
    );
}

#[test]
fn chat_template_raise_exception_is_an_error() {
    let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
    let t = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "x")], true).unwrap(),
        "ok"
    );
    let err = t
        .render(&[ChatMessage::new("assistant", "x")], true)
        .unwrap_err();
    match err {
        Error::ChatTemplate(msg) => {
            assert!(msg.contains("Conversation must start with user"), "{msg}")
        }
        other => panic!("expected a ChatTemplate error, got {other:?}"),
    }
}

#[test]
fn chat_template_syntax_error_is_an_error() {
    for source in [
        "{% for m in messages %}{{ m.content }}",
        "{{ messages[0].content ",
        "{% if %}",
    ] {
        let err = ChatTemplate::new(source, None, None).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{source:?}: {err:?}");
    }
}

#[test]
fn chat_template_validates_messages() {
    let t = model_template();
    assert!(matches!(t.render(&[], true), Err(Error::InvalidRequest(_))));
    let bad = [ChatMessage::new("user", "a"), ChatMessage::new("", "b")];
    assert!(matches!(
        t.render(&bad, true),
        Err(Error::InvalidRequest(_))
    ));
    // An empty content is allowed.
    assert!(t.render(&[ChatMessage::new("user", "")], true).is_ok());
}

#[test]
fn chat_template_jinja_compat() {
    let msgs = [ChatMessage::new("user", "  hello  ")];
    // trim_blocks / lstrip_blocks.
    let src =
        "{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}";
    assert_eq!(render_one(src, &msgs).unwrap(), "[user]\n");
    // keep_trailing_newline off, as Jinja2's default.
    assert_eq!(render_one("x\n", &msgs).unwrap(), "x");
    // Python string methods.
    assert_eq!(
        render_one("{{ messages[0].content.strip().upper() }}|{{ messages[0]['content'].startswith('  h') }}", &msgs)
            .unwrap(),
        "HELLO|True" // as Jinja2 prints a Python bool
    );
    // bos/eos tokens, string concatenation with +, loop variables.
    assert_eq!(
        render_one("{{ bos_token + messages[0].role + eos_token }}", &msgs).unwrap(),
        "<s>user</s>"
    );
    // Undefined variables render empty (Jinja2's default Undefined).
    assert_eq!(
        render_one("[{{ tools }}]{% if tools is defined %}T{% endif %}", &msgs).unwrap(),
        "[]"
    );
    // namespace() and dict .items().
    let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    assert_eq!(render_one(src, &msgs).unwrap(), "1a=1");
}

#[test]
fn chat_template_tojson_is_python_style() {
    let msgs = [ChatMessage::new("user", "é \"q\"\n<tag>")];
    assert_eq!(
        render_one(
            "{{ {'a': 1, 'b': [1, 2.5, none, true], 'c': {}} | tojson }}",
            &msgs
        )
        .unwrap(),
        r#"{"a": 1, "b": [1, 2.5, null, true], "c": {}}"#
    );
    assert_eq!(
        render_one("{{ messages[0].content | tojson }}", &msgs).unwrap(),
        r#""é \"q\"\n<tag>""#
    );
    assert_eq!(
        render_one(
            "{{ messages[0].content | tojson(ensure_ascii=true) }}",
            &msgs
        )
        .unwrap(),
        r#""\u00e9 \"q\"\n<tag>""#
    );
    assert_eq!(
        render_one("{{ {'a': [1, 2], 'b': 'x'} | tojson(indent=2) }}", &msgs).unwrap(),
        "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"x\"\n}"
    );
    assert_eq!(
        render_one(
            "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}",
            &msgs
        )
        .unwrap(),
        r#"{"a":2,"b":1}"#
    );
}

#[test]
fn chat_template_strftime() {
    // 2024-02-29T13:05:09Z was a Thursday.
    let t = 1_709_211_909;
    assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
    assert_eq!(
        strftime("%d %b %Y, %A %B %j %I%p %%", t),
        "29 Feb 2024, Thursday February 060 01PM %"
    );
    assert_eq!(strftime("%F", 0), "1970-01-01");
    let now = render_one("{{ strftime_now('%Y') }}", &[ChatMessage::new("user", "x")]).unwrap();
    assert_eq!(now.len(), 4);
}

#[test]
fn chat_template_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<ChatTemplate>();
}
