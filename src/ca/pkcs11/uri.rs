//! RFC 7512 `pkcs11:` URIs: the attributes payra reads, strictly.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// What a `pkcs11:` URI says (RFC 7512), of the attributes payra uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct UriParts {
    pub(super) token: Option<String>,
    pub(super) serial: Option<String>,
    pub(super) object: Option<String>,
    pub(super) id: Option<Vec<u8>>,
    pub(super) module: Option<PathBuf>,
    pub(super) pin_file: Option<PathBuf>,
}

/// Decodes %XX escapes.
fn percent_decode(value: &str) -> Result<Vec<u8>> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex_pair = bytes
                .get(i + 1..i + 3)
                .filter(|pair| pair.iter().all(u8::is_ascii_hexdigit))
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| {
                    Error::invalid("pkcs11.uri", format!("a bad %-escape in {value:?}"))
                })?;
            out.push(hex_pair);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The `name=value` pairs of a URI's path (`;`-separated) or query (`&`-separated); a name
/// already in `seen` is refused.
fn attributes<'a>(
    text: &'a str,
    separator: char,
    seen: &mut std::collections::HashSet<&'a str>,
) -> Result<Vec<(&'a str, &'a str)>> {
    let invalid = |why: String| Error::invalid("pkcs11.uri", why);
    let mut pairs = Vec::new();
    for attribute in text.split(separator).filter(|a| !a.is_empty()) {
        let (name, value) = attribute
            .split_once('=')
            .ok_or_else(|| invalid(format!("{attribute:?} has no value")))?;
        if !seen.insert(name) {
            return Err(invalid(format!("{name} appears twice")));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Parses the attributes payra reads from an RFC 7512 URI: `token`, `serial`, `object`,
/// `id`, `type` (must be `private`) in the path; `module-path` and `pin-source` (a file) in
/// the query. `pin-value` is refused (a PIN does not belong in the configuration), and so is
/// any other attribute, except vendor ones (`x-`).
pub(super) fn parse_uri(uri: &str) -> Result<UriParts> {
    let invalid = |why: String| Error::invalid("pkcs11.uri", why);
    let rest = uri
        .strip_prefix("pkcs11:")
        .ok_or_else(|| invalid("must start with pkcs11:".into()))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut parts = UriParts::default();
    let text = |name: &str, value: &str| -> Result<String> {
        String::from_utf8(percent_decode(value)?)
            .map_err(|_| invalid(format!("{name} is not UTF-8")))
    };
    // A name appears once in the whole URI, path and query together.
    let mut seen = std::collections::HashSet::new();
    for (name, value) in attributes(path, ';', &mut seen)? {
        match name {
            "token" => parts.token = Some(text(name, value)?),
            "serial" => parts.serial = Some(text(name, value)?),
            "object" => parts.object = Some(text(name, value)?),
            "id" => parts.id = Some(percent_decode(value)?),
            "type" if value == "private" => {}
            "type" => return Err(invalid(format!("type={value}: the key must be private"))),
            "manufacturer"
            | "model"
            | "library-description"
            | "library-manufacturer"
            | "library-version"
            | "slot-description"
            | "slot-manufacturer" => {}
            other if other.starts_with("x-") => {}
            other => {
                return Err(invalid(format!(
                    "payra does not use the attribute {other:?}"
                )))
            }
        }
    }
    for (name, value) in attributes(query, '&', &mut seen)? {
        match name {
            "module-path" => parts.module = Some(PathBuf::from(text(name, value)?)),
            "pin-source" => {
                let source = text(name, value)?;
                let path = source.strip_prefix("file:").unwrap_or(&source);
                if !path.starts_with('/') || path.starts_with("//") {
                    return Err(invalid(format!(
                        "pin-source {source:?} must be an absolute file path"
                    )));
                }
                parts.pin_file = Some(PathBuf::from(path));
            }
            "pin-value" => {
                return Err(invalid(
                    "pin-value puts the PIN in the configuration: use pin-source or pin_file"
                        .into(),
                ))
            }
            other if other.starts_with("x-") => {}
            other => {
                return Err(invalid(format!(
                    "payra does not use the attribute {other:?}"
                )))
            }
        }
    }
    Ok(parts)
}
