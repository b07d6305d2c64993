//! The canonical bytes of an event: what its leaf in the audit tree hashes (`docs/audit-log.md`
//! writes the encoding down for third-party verifiers).
//!
//! ```text
//! "stele-event/1" 0x0A
//! u64 position · str stream type · str stream id · u64 sequence
//! str event type · str event version · i64 recorded at (µs since the Unix epoch, UTC)
//! str payload (canonical JSON) · str metadata (canonical JSON)
//! ```
//!
//! Integers are big-endian; `str` is a u32 big-endian byte length, then the UTF-8 bytes.
//! Canonical JSON is the value with every object's keys in byte order, no white space, strings
//! escaped as serde_json writes them, numbers as they were stored. The payload is the one stored:
//! a person's values are in it sealed, so an erasure (which destroys keys, not bytes) never
//! changes a leaf.

use serde_json::Value;
use stele_engine::RecordedEvent;

/// The encoding's first line.
pub const DOMAIN: &[u8] = b"stele-event/1\n";

fn put_str(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text);
}

/// `value` as canonical JSON (see the module's documentation).
pub fn canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            // serde_json's maps iterate in key order already, unless its `preserve_order`
            // feature is on somewhere in the build.
            if map.keys().is_sorted_by(|a, b| a.as_bytes() <= b.as_bytes()) {
                canonical_object(map.iter(), out);
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                canonical_object(entries.into_iter(), out);
            }
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing to memory"),
    }
}

fn canonical_object<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("writing to memory");
        out.push(b':');
        canonical_json(value, out);
    }
    out.push(b'}');
}

/// The canonical bytes of `event` (see the module's documentation).
pub fn leaf_bytes(event: &RecordedEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&(event.position.0 as u64).to_be_bytes());
    put_str(&mut out, event.stream.aggregate_type.as_bytes());
    put_str(&mut out, event.stream.aggregate_id.as_bytes());
    out.extend_from_slice(&(event.sequence as u64).to_be_bytes());
    put_str(&mut out, event.event_type.as_bytes());
    put_str(&mut out, event.event_version.as_bytes());
    out.extend_from_slice(&event.recorded_at.timestamp_micros().to_be_bytes());
    let mut json = Vec::new();
    canonical_json(&event.payload, &mut json);
    put_str(&mut out, &json);
    json.clear();
    canonical_metadata(&event.metadata, &mut json);
    put_str(&mut out, &json);
    out
}

/// The metadata's canonical JSON, written straight from its fields (keys in byte order): the
/// same bytes as [`canonical_json`] of its JSON value, without building that value per event.
fn canonical_metadata(metadata: &stele_engine::EventMetadata, out: &mut Vec<u8>) {
    let command = &metadata.command;
    let mut field = |key: &str, value: &str| {
        out.push(if key == "actor" { b'{' } else { b',' });
        serde_json::to_writer(&mut *out, key).expect("writing to memory");
        out.push(b':');
        serde_json::to_writer(&mut *out, value).expect("writing to memory");
    };
    let mut buffer = uuid::Uuid::encode_buffer();
    let mut uuid = |id: &uuid::Uuid| id.hyphenated().encode_lower(&mut buffer).to_owned();
    field("actor", &command.actor);
    field("causation_id", &uuid(&command.causation_id));
    field("channel", &command.channel);
    field("command_id", &uuid(&command.command_id));
    field("correlation_id", &uuid(&command.correlation_id));
    field("event_id", &uuid(&metadata.event_id));
    if let Some(trace_id) = &command.trace_id {
        field("trace_id", trace_id);
    }
    out.push(b'}');
}

/// The leaf hash of `event`: RFC 6962's `SHA-256(0x00 ‖ bytes)`.
pub fn leaf_hash(event: &RecordedEvent) -> tlog_tiles::Hash {
    tlog_tiles::record_hash(&leaf_bytes(event))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_is_written_as_its_canonical_json() {
        let meta = stele_engine::CommandMeta::new("user:\"é\"", "api");
        for metadata in [
            meta.for_event(uuid::Uuid::now_v7()),
            meta.with_trace_id("4bf92f3577b34da6")
                .for_event(uuid::Uuid::now_v7()),
        ] {
            let (mut direct, mut generic) = (Vec::new(), Vec::new());
            canonical_metadata(&metadata, &mut direct);
            canonical_json(&serde_json::to_value(&metadata).unwrap(), &mut generic);
            assert_eq!(String::from_utf8(direct), String::from_utf8(generic));
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level_and_keeps_values() {
        let mut out = Vec::new();
        canonical_json(
            &json!({ "b": 1, "a": { "z": [true, null, 1.5], "y": "é\"" } }),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"y":"é\"","z":[true,null,1.5]},"b":1}"#
        );
    }
}
