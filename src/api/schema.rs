//! Schema fragments shared by the CRDs: patterns and CEL rules written once.

use schemars::{Schema, SchemaGenerator, json_schema};

/// RFC 1123 label, the shape of names that end up in Pod names, labels and RBAC resourceNames.
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A free-form JSON document (input, schemas, output): kept verbatim by the apiserver.
pub fn free_form(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A Kubernetes resource quantity that must be strictly positive and below `max`.
pub fn positive_quantity(what: &str, max: &str) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 32,
        "x-kubernetes-validations": [
            {"rule": "isQuantity(self)", "message": format!("{what} must be a Kubernetes quantity such as \"500m\" or \"4Gi\"")},
            {"rule": format!("!isQuantity(self) || (quantity(self).isGreaterThan(quantity('0')) && quantity(self).isLessThan(quantity('{max}')))"),
             "message": format!("{what} must be greater than 0 and less than {max}")},
        ],
    })
}

pub fn cpu_quantity(_: &mut SchemaGenerator) -> Schema {
    positive_quantity("cpu", "1025")
}

pub fn memory_quantity(_: &mut SchemaGenerator) -> Schema {
    positive_quantity("memory", "16Ti")
}

/// USD amount as a decimal string: floats are not allowed in Kubernetes specs, and money must
/// not be rounded by a YAML parser on the way in.
pub fn usd_budget(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 16,
        "pattern": r"^[0-9]{1,7}(\.[0-9]{1,6})?$",
        "x-kubernetes-validations": [
            {"rule": "self.matches('[1-9]')", "message": "maxCostUSD must be greater than 0"},
            {"rule": "!self.matches('^[0-9]{1,7}(\\\\.[0-9]{1,6})?$') || double(self) <= 1000000.0",
             "message": "maxCostUSD must be at most 1000000 (USD)"},
        ],
    })
}

/// Any JSON value (a template parameter's default): kept verbatim by the apiserver.
pub fn any_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
