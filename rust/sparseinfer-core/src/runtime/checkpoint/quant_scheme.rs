//! The weight quantization scheme a compressed-tensors `config.json` declares (`quantization_config`,
//! docs/FORMAT.md), and the check that every encoding it names is one [`super::encodings`] decodes.

use super::encodings::{Declared, PACK_QUANTIZED_MIN};
use crate::error::{Error, Result};

/// Integer weight quantization as a compressed checkpoint declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantScheme {
    /// 4 or 8.
    pub bits: u32,
    /// Columns per scale group; `None` = one scale per output channel.
    pub group_size: Option<usize>,
    /// `input_activations` declares int8 per-token dynamic quantization (compressed-tensors' W8A8 scheme):
    /// the model then runs with [`crate::kernels::Activations::Int8Token`] unless the caller asks otherwise. Other
    /// activation schemes (static per tensor, ...) run with the default per-64-column dynamic scales, which
    /// are at least as fine.
    pub token_acts: bool,
    /// Zero points (`W = scale · (q − zero_point)`, `<module>.weight_zero_point`) instead of symmetric codes.
    pub asymmetric: bool,
    /// Declared [`super::encodings::PACK_QUANTIZED_MIN`]: asymmetric 4-bit codes with float minimums
    /// (`<module>.weight_min`) in place of zero points.
    pub float_mins: bool,
}

impl QuantScheme {
    /// Reads `quantization_config.config_groups.*.weights` of a config.json; `Ok(None)` when absent.
    pub fn from_config(config: &serde_json::Value) -> Result<Option<QuantScheme>> {
        let bad = |m: String| Error::invalid("load", format!("quantization_config: {m}"));
        let qc = match config.get("quantization_config") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(q) if q.is_object() => q,
            Some(_) => return Err(bad("must be an object".into())),
        };
        let method = qc.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "compressed-tensors" {
            return Err(Error::unsupported(
                "load",
                format!("quantization method {method:?} is not supported (compressed-tensors)"),
            ));
        }
        if let Some(v) = qc.get("sparseinfer_format_version").and_then(|v| v.as_u64()) {
            if v > 1 {
                return Err(Error::unsupported(
                    "load",
                    format!("checkpoint format version {v} is newer than this sparseinfer (1)"),
                ));
            }
        }
        check_format(qc.get("format"), "quantization_config.format", Declared::Quantization)?;
        let is_min = |v: Option<&serde_json::Value>| v.and_then(|f| f.as_str()) == Some(PACK_QUANTIZED_MIN);
        let mut float_mins = is_min(qc.get("format"));
        if let Some(sc) = qc.get("sparsity_config").filter(|s| s.as_object().is_some_and(|o| !o.is_empty())) {
            check_format(sc.get("format"), "quantization_config.sparsity_config.format", Declared::Sparsity)?;
        }
        let Some(groups) = qc.get("config_groups").and_then(|g| g.as_object()) else { return Ok(None) };
        let mut scheme = None;
        for (gname, g) in groups {
            let field = format!("quantization_config.config_groups.{gname}.format");
            check_format(g.get("format"), &field, Declared::Quantization)?;
            float_mins |= is_min(g.get("format"));
            let w = g.get("weights").ok_or_else(|| bad("a config group has no \"weights\"".into()))?;
            let bits = w
                .get("num_bits")
                .and_then(|b| b.as_u64())
                .and_then(|b| u32::try_from(b).ok())
                .ok_or_else(|| bad("no usable num_bits".into()))?;
            if bits != 4 && bits != 8 {
                return Err(Error::unsupported("load", format!("{bits}-bit weights are not supported (4, 8)")));
            }
            if w.get("type").and_then(|t| t.as_str()).unwrap_or("int") != "int" {
                return Err(Error::unsupported("load", "only integer weight quantization is supported"));
            }
            let asymmetric = !w.get("symmetric").and_then(|t| t.as_bool()).unwrap_or(true);
            let group_size = w.get("group_size").and_then(|g| g.as_u64()).map(|g| g as usize);
            let token_acts = g.get("input_activations").is_some_and(|a| {
                a.get("num_bits").and_then(|b| b.as_u64()) == Some(8)
                    && a.get("type").and_then(|t| t.as_str()).unwrap_or("int") == "int"
                    && a.get("strategy").and_then(|s| s.as_str()) == Some("token")
                    && a.get("dynamic").and_then(|d| d.as_bool()) == Some(true)
            });
            let s = QuantScheme { bits, group_size, token_acts, asymmetric, float_mins };
            if float_mins && (bits != 4 || !asymmetric) {
                return Err(bad(format!(
                    "format {PACK_QUANTIZED_MIN:?} is asymmetric 4-bit codes; config group {gname:?} declares \
                     {bits}-bit {}",
                    if asymmetric { "asymmetric" } else { "symmetric" }
                )));
            }
            if scheme.is_some_and(|x| x != s) {
                return Err(Error::unsupported("load", "mixed quantization schemes are not supported"));
            }
            scheme = Some(s);
        }
        Ok(scheme)
    }
}

/// Refuses a compressed-tensors format (a string at `field` of config.json, absent or null: not declared) that
/// no decoder of [`super::encodings::ENCODINGS`] reads where it is declared: its tensors would be read as
/// something they are not.
fn check_format(v: Option<&serde_json::Value>, field: &str, kind: Declared) -> Result<()> {
    let known = super::encodings::format_names(kind);
    match v {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(f)) if known.contains(&f.as_str()) => Ok(()),
        Some(serde_json::Value::String(f)) => Err(Error::unsupported(
            "load",
            format!("config.json {field}: compressed-tensors format {f:?} is not supported ({})", known.join(", ")),
        )),
        Some(other) => Err(Error::invalid("load", format!("config.json {field}: {other} is not a format name"))),
    }
}
