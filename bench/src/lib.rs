//! Shared inputs for sluice's benchmarks, and the load harness
//! (`sluice-load`, in [`load`]).

pub mod load;

use std::sync::Arc;

use sluice_core::policy::{Constitution, Principle};
use sluice_core::Config;

/// The default output set: PII (all entities) redacted, secrets blocked.
pub fn default_constitution() -> Constitution {
    let c = Config::parse(
        r#"
allow_anonymous = true
[providers.sim]
kind = "simulated"
[deployments.d]
stable = "v1"
variants.v1 = { provider = "sim", model = "m" }
principles = ["no-pii-leak", "no-secrets"]
[principles.no-pii-leak]
applies_to = ["output"]
action = "redact"
detectors = [{ kind = "pii" }]
[principles.no-secrets]
applies_to = ["input", "output"]
action = "block"
detectors = [{ kind = "secrets" }]
"#,
    )
    .expect("benchmark config is valid");
    Constitution {
        principles: c
            .principles
            .values()
            .map(|p| Arc::new(Principle::compile(p).expect("compiles")))
            .collect(),
    }
}

/// Realistic assistant prose of `len` bytes, with a PII hit about every 2 KB.
pub fn text(len: usize) -> String {
    let para = "Thanks for reaching out about your order. You can check the status on the orders page, \
                and a refund usually takes three to five business days once the return is received. \
                If anything looks wrong, reply to this message and our support team will take a look. ";
    let mut out = String::with_capacity(len + para.len());
    let mut i = 0;
    while out.len() < len {
        out.push_str(para);
        if i % 6 == 5 {
            out.push_str("Contact jane.doe@corp.io for details. ");
        }
        i += 1;
    }
    out.truncate(len);
    while !out.is_char_boundary(out.len()) {
        out.pop();
    }
    out
}
