//! AES-GCM test vectors: the text format of `vectors/*.txt` and the copies
//! compiled into the binary, so the power-on self-test needs no files.
//!
//! Format: `#` comments, blank lines, and one `[name]` section per case with
//! `key`, `nonce`, `aad`, `pt`, `ct`, `tag` (hex, may be empty) and
//! `result = valid|invalid`. Each file states where its values come from.

use crate::hex;

use super::{IcvLen, NONCE_LEN};

/// The vector files compiled into the binary, by file name.
pub const BUILTIN_FILES: &[(&str, &str)] = &[
    (
        "aes_gcm_spec.txt",
        include_str!("../../vectors/aes_gcm_spec.txt"),
    ),
    (
        "aes_gcm_esp.txt",
        include_str!("../../vectors/aes_gcm_esp.txt"),
    ),
];

#[derive(Clone, PartialEq, Eq)]
pub struct AeadVector {
    pub name: String,
    pub key: Vec<u8>,
    pub nonce: [u8; NONCE_LEN],
    pub aad: Vec<u8>,
    pub pt: Vec<u8>,
    pub ct: Vec<u8>,
    pub tag: Vec<u8>,
    /// False for a case that must be rejected by `open`.
    pub valid: bool,
}

impl std::fmt::Debug for AeadVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Test keys are public, but keep the habit: vectors print by name.
        write!(f, "AeadVector({})", self.name)
    }
}

impl AeadVector {
    pub fn icv_len(&self) -> Option<IcvLen> {
        IcvLen::from_bytes(self.tag.len()).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct VectorError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

#[derive(Default)]
struct Pending {
    name: String,
    line: usize,
    fields: [Option<Vec<u8>>; 6],
    valid: Option<bool>,
}

const FIELDS: [&str; 6] = ["key", "nonce", "aad", "pt", "ct", "tag"];

/// Parses one vector file. Every case must have every field.
pub fn parse(file: &str, text: &str) -> Result<Vec<AeadVector>, VectorError> {
    let err = |line: usize, reason: String| VectorError {
        file: file.to_string(),
        line,
        reason,
    };
    let mut out = Vec::new();
    let mut pending: Option<Pending> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if let Some(done) = pending.take() {
                out.push(finish(done).map_err(|(l, r)| err(l, r))?);
            }
            pending = Some(Pending {
                name: name.to_string(),
                line: line_no,
                ..Pending::default()
            });
            continue;
        }
        let case = pending
            .as_mut()
            .ok_or_else(|| err(line_no, "field before the first [name]".into()))?;
        let (field, value) = line
            .split_once('=')
            .ok_or_else(|| err(line_no, format!("expected `field = value`, got {line:?}")))?;
        let (field, value) = (field.trim(), value.trim());
        if field == "result" {
            case.valid = Some(match value {
                "valid" => true,
                "invalid" => false,
                other => {
                    return Err(err(
                        line_no,
                        format!("result must be valid|invalid, got {other:?}"),
                    ));
                }
            });
            continue;
        }
        let slot = FIELDS
            .iter()
            .position(|f| *f == field)
            .ok_or_else(|| err(line_no, format!("unknown field {field:?}")))?;
        if case.fields[slot].is_some() {
            return Err(err(line_no, format!("field {field:?} given twice")));
        }
        let bytes = hex::decode(value).map_err(|e| err(line_no, format!("{field}: {e}")))?;
        case.fields[slot] = Some(bytes);
    }
    if let Some(done) = pending.take() {
        out.push(finish(done).map_err(|(l, r)| err(l, r))?);
    }
    Ok(out)
}

fn finish(case: Pending) -> Result<AeadVector, (usize, String)> {
    let at = case.line;
    let name = case.name;
    let [key, nonce, aad, pt, ct, tag] = case.fields;
    let take = |slot: Option<Vec<u8>>, field: &str| {
        slot.ok_or_else(|| (at, format!("[{name}] is missing `{field}`")))
    };
    let key = take(key, "key")?;
    let nonce = take(nonce, "nonce")?;
    let aad = take(aad, "aad")?;
    let pt = take(pt, "pt")?;
    let ct = take(ct, "ct")?;
    let tag = take(tag, "tag")?;
    let valid = case
        .valid
        .ok_or_else(|| (at, format!("[{name}] is missing `result`")))?;
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|n: Vec<u8>| (at, format!("[{name}] nonce is {} bytes, want 12", n.len())))?;
    if key.len() != 16 && key.len() != 32 {
        return Err((
            at,
            format!("[{name}] key is {} bytes, want 16 or 32", key.len()),
        ));
    }
    if IcvLen::from_bytes(tag.len()).is_err() {
        return Err((
            at,
            format!("[{name}] tag is {} bytes, want 8, 12 or 16", tag.len()),
        ));
    }
    if valid && pt.len() != ct.len() {
        return Err((at, format!("[{name}] pt and ct lengths differ")));
    }
    Ok(AeadVector {
        name,
        key,
        nonce,
        aad,
        pt,
        ct,
        tag,
        valid,
    })
}

/// All compiled-in vectors.
pub fn builtin() -> Result<Vec<AeadVector>, VectorError> {
    let mut all = Vec::new();
    for (file, text) in BUILTIN_FILES {
        all.extend(parse(file, text)?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# a comment\n\n[one]\nkey = 000102030405060708090a0b0c0d0e0f\n\
        nonce = 000000000000000000000000\naad =\npt = 00\nct = 11\n\
        tag = 00112233445566778899aabbccddeeff\nresult = valid\n";

    #[test]
    fn parses_a_case_with_empty_fields() {
        let v = parse("sample", SAMPLE).expect("sample parses");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "one");
        assert!(v[0].aad.is_empty());
        assert_eq!(v[0].ct, vec![0x11]);
        assert!(v[0].valid);
    }

    #[test]
    fn reports_missing_and_malformed_fields_with_line_numbers() {
        let missing = SAMPLE.replace("ct = 11\n", "");
        let e = parse("f", &missing).expect_err("missing ct");
        assert!(e.reason.contains("missing `ct`"), "{e}");
        let bad = SAMPLE.replace("pt = 00", "pt = 0g");
        let e = parse("f", &bad).expect_err("bad hex");
        assert_eq!(e.line, 7);
        let short_nonce = SAMPLE.replace("nonce = 000000000000000000000000", "nonce = 00");
        assert!(parse("f", &short_nonce).is_err());
    }

    #[test]
    fn builtin_vectors_parse_and_cover_what_the_boot_test_needs() {
        let all = builtin().expect("compiled-in vectors parse");
        let has = |f: &dyn Fn(&AeadVector) -> bool| all.iter().any(f);
        assert!(has(&|v| v.key.len() == 16 && v.valid));
        assert!(has(&|v| v.key.len() == 32 && v.valid));
        assert!(has(&|v| v.pt.is_empty() && v.valid), "empty plaintext");
        assert!(has(&|v| v.aad.is_empty() && !v.pt.is_empty()), "empty AAD");
        assert!(has(&|v| v.pt.len() % 16 != 0 && v.valid), "partial block");
        assert!(has(&|v| v.aad.len() == 8 && v.valid), "ESP AAD");
        assert!(has(&|v| v.aad.len() == 12 && v.valid), "ESP ESN AAD");
        for icv in [8, 12] {
            assert!(has(&|v| v.tag.len() == icv && v.valid), "{icv}-byte ICV");
        }
        assert!(has(&|v| !v.valid), "negative cases");
    }
}
