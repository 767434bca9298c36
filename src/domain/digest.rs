//! Content digests of what users approve and reuse: a job's spec, a template's spec.

use serde::Serialize;

/// `sha256:<hex>` of `value` serialized as JSON. The same value always serializes the same way
/// (struct fields in declaration order, maps as stored), so the digest of a spec read back from
/// the API equals the one recorded when the operator first read it.
pub fn sha256_of_json(value: &impl Serialize) -> String {
    // Serializing our own API types cannot fail; `null` stands in if it ever did, and a
    // mismatching digest then refuses the rerun rather than running something unverified.
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256:");
    for byte in digest.as_ref() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The first 12 hex digits, for tables.
pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_of_the_json() {
        // sha256("{}") from coreutils' sha256sum.
        assert_eq!(sha256_of_json(&serde_json::json!({})), "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
        assert_eq!(short(&sha256_of_json(&serde_json::json!({}))), "44136fa355b3");
    }
}
