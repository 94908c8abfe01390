//! A non-streamed OpenAI answer read without building a JSON tree.
//!
//! On the request path an answer is usually sent on byte for byte; sluice
//! only needs each choice's text (for the output principles and the refusal
//! signal), the finish reason and the token usage. [`RawCompletion::read`]
//! decodes exactly those (borrowing from the bytes where the text has no
//! escapes) and skips everything else, checking it for JSON syntax only. An
//! answer of any other shape (an `error` member, no `choices` array, a
//! choice that is not an object, content that is not a string or null,
//! duplicate keys among the ones read, usage counts that are not unsigned
//! integers, bytes that are not UTF-8) is not read this way: the caller
//! decodes it as a tree as before, so its result and its error messages are
//! those of the tree.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use sluice_core::chat::Usage;

use crate::{Completion, ProviderError};

/// A non-streamed answer as the request path takes it.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Decoded as a JSON tree (every provider but OpenAI's, and OpenAI
    /// answers of an unusual shape).
    Complete(Completion),
    /// An OpenAI answer whose bytes can go to the client unchanged, with
    /// what sluice reads from it.
    Raw(RawCompletion),
}

impl Reply {
    /// The answer as a [`Completion`], decoding a raw one as a tree.
    pub fn into_completion(self, provider: &str) -> Result<Completion, ProviderError> {
        match self {
            Reply::Complete(c) => Ok(c),
            Reply::Raw(r) => r.parse(provider),
        }
    }
}

/// An OpenAI `chat.completion` answer kept as its bytes, with each choice's
/// text, the finish reason and the usage read from them.
#[derive(Debug, Clone)]
pub struct RawCompletion {
    raw: Bytes,
    /// Each choice's `message.content`, where it is a string.
    pub texts: Vec<Option<String>>,
    /// The first `finish_reason` a choice gives.
    pub finish_reason: Option<String>,
    /// Token usage, if reported.
    pub usage: Option<Usage>,
}

#[derive(Deserialize)]
struct View<'a> {
    #[serde(default, deserialize_with = "present")]
    error: bool,
    #[serde(borrow)]
    choices: Vec<Obj<ChoiceView<'a>>>,
    #[serde(default)]
    usage: Option<Obj<UsageView>>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    message: Option<Obj<MessageView<'a>>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UsageView {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

/// A struct read from a JSON object only (a derived struct would also take
/// an array of its fields in order, which the tree does not read as one).
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
    }
}

/// A member that is there, whatever its value (`null` included).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d)?;
    Ok(true)
}

impl RawCompletion {
    /// Reads an answer's bytes; gives them back when the answer is not of
    /// the plain shape this reads (see the module's notes).
    pub fn read(raw: Bytes) -> Result<RawCompletion, Bytes> {
        let Ok(text) = std::str::from_utf8(&raw) else {
            return Err(raw);
        };
        let view: View<'_> = match serde_json::from_str::<Obj<View<'_>>>(text) {
            Ok(Obj(v)) => v,
            Err(_) => return Err(raw),
        };
        if view.error {
            return Err(raw);
        }
        let finish_reason = view
            .choices
            .iter()
            .find_map(|c| c.0.finish_reason.as_deref())
            .map(str::to_string);
        let texts = view
            .choices
            .into_iter()
            .map(|c| c.0.message.and_then(|m| m.0.content).map(Cow::into_owned))
            .collect();
        let usage = view.usage.map(|Obj(u)| {
            let p = u.prompt_tokens.unwrap_or(0);
            let c = u.completion_tokens.unwrap_or(0);
            Usage {
                prompt_tokens: p,
                completion_tokens: c,
                total_tokens: u.total_tokens.unwrap_or(p + c),
            }
        });
        Ok(RawCompletion {
            raw,
            texts,
            finish_reason,
            usage,
        })
    }

    /// The first choice's text, or nothing.
    pub fn first_text(&self) -> &str {
        self.texts.first().and_then(|t| t.as_deref()).unwrap_or("")
    }

    /// The upstream's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.raw
    }

    /// The upstream's bytes, to send on.
    pub fn into_bytes(self) -> Bytes {
        self.raw
    }

    /// Decodes the answer as a tree, for when it must be changed.
    pub fn parse(self, provider: &str) -> Result<Completion, ProviderError> {
        crate::openai::completion_from_bytes(provider, self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// The choices' texts, the finish reason and the usage.
    type Read = (Vec<Option<String>>, Option<String>, Option<Usage>);

    /// What the tree path reads from the same bytes.
    fn by_tree(raw: &[u8]) -> Option<Read> {
        let c = crate::openai::completion_from_bytes("up", Bytes::copy_from_slice(raw)).ok()?;
        let texts = c.body["choices"]
            .as_array()?
            .iter()
            .map(|ch| ch["message"]["content"].as_str().map(str::to_string))
            .collect();
        Some((texts, sluice_core::chat::finish_reason(&c.body), c.usage))
    }

    fn by_view(raw: &[u8]) -> Option<Read> {
        let r = RawCompletion::read(Bytes::copy_from_slice(raw)).ok()?;
        Some((r.texts, r.finish_reason, r.usage))
    }

    #[test]
    fn reads_a_plain_answer_and_keeps_its_bytes() {
        let raw = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"you\"\n"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let r = RawCompletion::read(Bytes::from_static(raw)).expect("plain shape");
        assert_eq!(r.texts, vec![Some("Hi \"you\"\n".to_string())]);
        assert_eq!(r.first_text(), "Hi \"you\"\n");
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            r.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5
            })
        );
        assert_eq!(r.bytes().as_ref(), raw.as_slice());
        let c = r.parse("up").expect("valid");
        assert_eq!(c.body["choices"][0]["message"]["content"], "Hi \"you\"\n");
        assert_eq!(c.raw.as_deref(), Some(raw.as_slice()));
    }

    #[test]
    fn unusual_shapes_go_the_tree_way() {
        for raw in [
            r#"{"error":null,"choices":[]}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"choices":null}"#,
            r#"{"object":"chat.completion"}"#,
            r#"{"choices":[null]}"#,
            r#"{"choices":[{"message":{"content":[{"type":"text","text":"hi"}]}}]}"#,
            r#"{"choices":[{"finish_reason":3}]}"#,
            r#"{"choices":[],"choices":[]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1.5}}"#,
            r#"{"choices":[],"usage":7}"#,
            r#"{"choices":[],"usage":[1,2,3]}"#,
            r#"[false,[]]"#,
            r#"{"choices":[[{"content":"hi"},"stop"]]}"#,
            r#"{"choices":[{"message":["hi"]}]}"#,
            r#"{"choices":[]"#,
            "{\"choices\":[],\"x\":\"\u{0}\"}",
        ] {
            assert!(
                RawCompletion::read(Bytes::copy_from_slice(raw.as_bytes())).is_err(),
                "{raw}"
            );
        }
        let bad_utf8 = b"{\"choices\":[],\"x\":\"\xff\"}";
        assert!(RawCompletion::read(Bytes::from_static(bad_utf8)).is_err());
    }

    /// JSON values of every kind, for the fields the view reads and for ones
    /// it skips.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u32>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
            "[a-z\"\\\\\u{e9}\n ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn maybe(v: Value) -> impl Strategy<Value = Option<Value>> {
        prop_oneof![Just(None), Just(Some(v))]
    }

    /// An answer that is mostly of the plain shape, with any value in any
    /// of the places the view reads.
    fn answer() -> impl Strategy<Value = String> {
        let content = prop_oneof![
            3 => "[a-zA-Z0-9 \"\\\\@.\n\u{e9}\u{1F600}]{0,40}".prop_map(Value::String),
            1 => any_json(),
        ];
        let finish = prop_oneof![
            3 => prop_oneof![Just("stop"), Just("length"), Just("content_filter")]
                .prop_map(|s| json!(s)),
            1 => any_json(),
        ];
        let message = (content, any_json())
            .prop_map(|(c, extra)| json!({"role": "assistant", "content": c, "extra": extra}));
        let choice = prop_oneof![
            6 => (message, finish).prop_map(|(m, f)| json!({"index": 0, "message": m, "finish_reason": f})),
            1 => any_json(),
        ];
        let choices = prop_oneof![
            6 => prop::collection::vec(choice, 0..3).prop_map(Value::Array),
            1 => any_json(),
        ];
        let count = prop_oneof![3 => any::<u32>().prop_map(|n| json!(n)), 1 => any_json()];
        let usage = prop_oneof![
            3 => (count.clone(), count.clone(), count).prop_map(|(p, c, t)| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": t})),
            1 => any_json(),
        ];
        (
            choices,
            maybe(json!(null)),
            usage,
            any_json(),
            any::<bool>(),
        )
            .prop_flat_map(|(choices, _, usage, extra, with_error)| {
                let error = if with_error {
                    maybe(json!({"message": "x"})).boxed()
                } else {
                    Just(None).boxed()
                };
                error.prop_map(move |error| {
                    let mut o = serde_json::Map::new();
                    o.insert("id".into(), json!("chatcmpl-1"));
                    o.insert("choices".into(), choices.clone());
                    o.insert("usage".into(), usage.clone());
                    o.insert("extra".into(), extra.clone());
                    if let Some(e) = error {
                        o.insert("error".into(), e);
                    }
                    Value::Object(o).to_string()
                })
            })
    }

    proptest! {
        /// Whatever the view reads, the tree reads the same; an answer the
        /// view refuses is left to the tree.
        #[test]
        fn the_view_reads_what_the_tree_reads(raw in answer()) {
            if let Some(v) = by_view(raw.as_bytes()) {
                prop_assert_eq!(Some(v), by_tree(raw.as_bytes()), "{}", raw);
            }
        }

        /// Arbitrary bytes are read or given back, never a panic.
        #[test]
        fn arbitrary_bytes_are_read_or_refused(raw in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = RawCompletion::read(Bytes::from(raw));
        }
    }
}
