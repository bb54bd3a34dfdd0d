//! The checkpoint format version (docs/FORMAT.md, "Versioning").
//!
//! A model directory may declare it in two places: `format_version` in `sparseinfer.json` (our exports always
//! write it) and `quantization_config.sparseinfer_format_version` in `config.json`. Where declared, it must be a
//! JSON integer: a version newer than this build reads is [`Error::Unsupported`], and anything else (a string
//! such as `"2"`, a float such as `2.0`, a bool, null, zero or a negative number) is refused by name, so that a
//! version this build would misread can never pass as one it knows.

use super::files::{ModelDir, MAX_JSON_BYTES};
use crate::error::{Error, Result};
use serde_json::Value;

/// The newest checkpoint format version this build reads (versions start at 1).
pub const FORMAT_VERSION: u64 = 1;

const OP: &str = "load";

/// Checks every format version the directory declares (`config` is its parsed `config.json`).
pub fn check(dir: &ModelDir, config: &Value) -> Result<()> {
    if let Some(v) = config.get("quantization_config").and_then(|q| q.get("sparseinfer_format_version")) {
        check_value(v, &dir.shown("config.json"), "quantization_config.sparseinfer_format_version")?;
    }
    let Some(info) = dir.read_json("sparseinfer.json", MAX_JSON_BYTES)? else { return Ok(()) };
    let shown = dir.shown("sparseinfer.json");
    let Some(obj) = info.as_object() else {
        return Err(Error::invalid(OP, format!("{shown}: not a JSON object")));
    };
    match obj.get("format_version") {
        Some(v) => check_value(v, &shown, "format_version"),
        None => Err(Error::invalid(OP, format!("{shown}: no \"format_version\" (docs/FORMAT.md)"))),
    }
}

/// `v`, the value of `field` in the file `shown`, must be an integer from 1 to [`FORMAT_VERSION`]. The message
/// names the value's JSON type, never a string's contents.
fn check_value(v: &Value, shown: &str, field: &str) -> Result<()> {
    let got = match v {
        Value::Number(n) => match n.as_u64() {
            Some(1..=FORMAT_VERSION) => return Ok(()),
            Some(version) if version > FORMAT_VERSION => {
                return Err(Error::unsupported(
                    OP,
                    format!(
                        "{shown}: {field} {version}: this checkpoint format version is newer than this \
                         sparseinfer reads ({FORMAT_VERSION})"
                    ),
                ))
            }
            _ if n.is_f64() => format!("the number {n} (not an integer)"),
            _ => format!("{n}"),
        },
        Value::String(_) => "a string".to_string(),
        Value::Bool(b) => format!("{b}"),
        Value::Null => "null".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    Err(Error::invalid(
        OP,
        format!("{shown}: {field} must be an integer format version from 1 to {FORMAT_VERSION}, got {got}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_integers_pass() {
        let check = |s: &str| check_value(&serde_json::from_str(s).unwrap(), "f", "format_version");
        assert!(check("1").is_ok());
        assert!(matches!(check("2"), Err(Error::Unsupported { .. })));
        for bad in ["\"1\"", "\"2\"", "1.0", "2.0", "1e0", "0", "-1", "true", "null", "[1]", "{}"] {
            assert!(matches!(check(bad), Err(Error::InvalidInput { .. })), "{bad}");
        }
    }
}
