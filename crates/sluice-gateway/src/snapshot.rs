//! The compiled, immutable view of the configuration that the request path
//! reads: providers with their clients, deployments, and API key digests.
//!
//! Invariant: the request path only ever reads a [`Snapshot`] through an
//! `ArcSwap`; a new configuration is compiled off the hot path and swapped in
//! whole, so a request sees either the old or the new config, never a mix.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::path::Path;

use sluice_core::config::{ApiKeySecret, Config, DeploymentConfig, DetectorConfig, KeyRole, Role};
use sluice_core::policy::{Constitution, Principle};
use sluice_core::secret::{digest, KeyDigest, SecretSource};
use sluice_providers::Provider;

use crate::upstream::{Health, Upstream};
use subtle::ConstantTimeEq;

/// An API key as the gateway holds it: a name and a digest.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// Name recorded with requests.
    pub name: String,
    digest: KeyDigest,
    /// Deployments this key may use (`None`: all).
    pub deployments: Option<Vec<String>>,
    /// Whether it may pin variants.
    pub role: KeyRole,
}

/// An admin token as the gateway holds it.
#[derive(Debug, Clone)]
pub struct AdminToken {
    /// Name recorded as the actor.
    pub name: String,
    /// What it may do.
    pub role: Role,
    digest: KeyDigest,
}

impl ApiKey {
    /// Whether this key may call the deployment.
    pub fn may_use(&self, deployment: &str) -> bool {
        self.deployments
            .as_ref()
            .is_none_or(|d| d.iter().any(|x| x == deployment))
    }
}

/// A deployment with its variants' providers resolved.
#[derive(Clone)]
pub struct Deployment {
    /// The config entry.
    pub config: DeploymentConfig,
    /// Provider of each variant, by variant name.
    pub providers: BTreeMap<String, Arc<Upstream>>,
    /// The principles enforced on it, compiled (shared: every request
    /// takes a reference).
    pub constitution: Arc<Constitution>,
    /// Requests to it being served now (for `max_in_flight`); carried over
    /// across reloads.
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Its name as the `x-sluice-deployment` response header, built once.
    pub name_header: Option<axum::http::HeaderValue>,
    /// Each variant's name as the `x-sluice-variant` response header.
    pub variant_headers: BTreeMap<String, axum::http::HeaderValue>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("config", &self.config)
            .field("principles", &self.config.principles)
            .finish()
    }
}

/// Everything the request path needs, immutable.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config this was built from.
    pub config: Config,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Every provider, by name (judges call them directly).
    pub providers: BTreeMap<String, Arc<Upstream>>,
    /// Client keys.
    pub keys: Vec<ApiKey>,
    /// Admin tokens.
    pub admin_tokens: Vec<AdminToken>,
    /// Every principle, compiled (probe assertions may name any of them).
    pub principles: BTreeMap<String, Arc<Principle>>,
    /// The directory relative files are read from.
    pub base_dir: Option<std::path::PathBuf>,
    /// The probe suites stage gates require, by the path written in the
    /// config; read and checked when the config is loaded.
    pub suites: BTreeMap<String, Arc<sluice_core::probe::Suite>>,
}

/// Reads a secret from its source.
pub trait SecretResolver {
    /// The secret's value, or a message saying why it is unavailable.
    fn resolve(&self, source: &SecretSource) -> Result<String, String>;
}

/// Resolves secrets from the process environment and the file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnvSecrets;

impl SecretResolver for EnvSecrets {
    fn resolve(&self, source: &SecretSource) -> Result<String, String> {
        match source {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                Ok(_) => Err(format!("environment variable {var} is empty")),
                Err(_) => Err(format!("environment variable {var} is not set")),
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                Ok(_) => Err(format!("file {path} is empty")),
                Err(e) => Err(format!("cannot read file {path}: {e}")),
            },
        }
    }
}

impl Snapshot {
    /// Compiles a config: resolves secrets and builds provider clients.
    /// Returns every problem found.
    /// Relative `system_prompt_file`s are read from `base_dir`.
    pub fn build(
        config: Config,
        secrets: &dyn SecretResolver,
        base_dir: Option<&Path>,
    ) -> Result<Snapshot, Vec<String>> {
        Self::build_after(config, secrets, base_dir, None)
    }

    /// Like [`Snapshot::build`], carrying over each provider's health
    /// (breaker state, retry budget, counters) from `previous` when its
    /// retry and breaker settings are unchanged.
    pub fn build_after(
        mut config: Config,
        secrets: &dyn SecretResolver,
        base_dir: Option<&Path>,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, Vec<String>> {
        let mut errors = Vec::new();
        if config.store.log_bodies == sluice_core::config::LogBodies::Redacted {
            // Redacting recorded bodies runs the built-in detectors on every
            // request; compile them now rather than on the first one.
            sluice_core::policy::prepare_redaction();
        }
        for d in config.deployments.values_mut() {
            for v in d.variants.values_mut() {
                if let Some(f) = &v.system_prompt_file {
                    let path = match base_dir {
                        Some(b) if Path::new(f).is_relative() => b.join(f),
                        _ => Path::new(f).to_path_buf(),
                    };
                    match std::fs::read_to_string(&path) {
                        Ok(text) => v.system_prompt = Some(text.trim_end().to_string()),
                        Err(e) => errors.push(format!(
                            "deployments.{}.variants.{}.system_prompt_file: cannot read {}: {e}",
                            d.name,
                            v.name,
                            path.display()
                        )),
                    }
                }
            }
        }
        let mut admin_tokens = Vec::new();
        for (i, t) in config.admin_tokens.iter().enumerate() {
            let digest = match &t.secret {
                ApiKeySecret::Sha256(d) => Some(*d),
                ApiKeySecret::Source(src) => match secrets.resolve(src) {
                    Ok(v) => Some(digest(&v)),
                    Err(e) => {
                        errors.push(format!("admin_tokens[{i}] ({}): {e}", t.name));
                        None
                    }
                },
            };
            if let Some(digest) = digest {
                admin_tokens.push(AdminToken {
                    name: t.name.clone(),
                    role: t.role,
                    digest,
                });
            }
        }
        let mut keys = Vec::new();
        for (i, k) in config.api_keys.iter().enumerate() {
            let digest = match &k.secret {
                ApiKeySecret::Sha256(d) => Some(*d),
                ApiKeySecret::Source(src) => match secrets.resolve(src) {
                    Ok(v) => Some(digest(&v)),
                    Err(e) => {
                        errors.push(format!("api_keys[{i}] ({}): {e}", k.name));
                        None
                    }
                },
            };
            if let Some(digest) = digest {
                keys.push(ApiKey {
                    name: k.name.clone(),
                    digest,
                    deployments: k.deployments.clone(),
                    role: k.role,
                });
            }
        }
        let mut providers: BTreeMap<String, Arc<Upstream>> = BTreeMap::new();
        for (name, p) in &config.providers {
            let key = match config
                .secret_sources()
                .into_iter()
                .find(|(path, _)| path == &format!("providers.{name}"))
            {
                Some((_, src)) => match secrets.resolve(&src) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        errors.push(format!("providers.{name}: {e}"));
                        continue;
                    }
                },
                None => None,
            };
            match Provider::build(p, key) {
                Ok(built) => {
                    let health = previous
                        .and_then(|s| s.providers.get(name))
                        .map(|u| u.health.clone())
                        .filter(|h| h.fits(p))
                        .unwrap_or_else(|| Arc::new(Health::new(p)));
                    providers.insert(name.clone(), Arc::new(Upstream::new(built, health)));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // Rubric files are read here (the I/O edge); principles compile once
        // and are shared by every deployment that names them.
        for p in config.principles.values_mut() {
            for (i, d) in p.detectors.iter_mut().enumerate() {
                if let DetectorConfig::Judge {
                    rubric,
                    rubric_file: Some(f),
                    ..
                } = d
                {
                    let path = match base_dir {
                        Some(b) if Path::new(f.as_str()).is_relative() => b.join(f.as_str()),
                        _ => Path::new(f.as_str()).to_path_buf(),
                    };
                    match std::fs::read_to_string(&path) {
                        Ok(text) => *rubric = Some(text),
                        Err(e) => errors.push(format!(
                            "principles.{}.detectors[{i}].rubric_file: cannot read {}: {e}",
                            p.id,
                            path.display()
                        )),
                    }
                }
            }
        }
        let mut compiled: BTreeMap<String, Arc<Principle>> = BTreeMap::new();
        for (id, p) in &config.principles {
            match Principle::compile(p) {
                Ok(c) => {
                    compiled.insert(id.clone(), Arc::new(c));
                }
                Err(e) => errors.push(e),
            }
        }
        let mut deployments = BTreeMap::new();
        for (name, d) in &config.deployments {
            let mut dp = BTreeMap::new();
            let mut variant_headers = BTreeMap::new();
            for (vname, v) in &d.variants {
                if let Some(p) = providers.get(&v.provider) {
                    dp.insert(vname.clone(), p.clone());
                }
                if let Ok(h) = axum::http::HeaderValue::from_str(vname) {
                    variant_headers.insert(vname.clone(), h);
                }
            }
            deployments.insert(
                name.clone(),
                Deployment {
                    in_flight: previous
                        .and_then(|s| s.deployments.get(name))
                        .map(|d| d.in_flight.clone())
                        .unwrap_or_default(),
                    config: d.clone(),
                    providers: dp,
                    name_header: axum::http::HeaderValue::from_str(name).ok(),
                    variant_headers,
                    constitution: Arc::new(Constitution {
                        principles: d
                            .principles
                            .iter()
                            .filter_map(|p| compiled.get(p).cloned())
                            .collect(),
                    }),
                },
            );
        }
        let mut suites = BTreeMap::new();
        for r in config.rollouts.values() {
            for (i, st) in r.stages.iter().enumerate() {
                for (j, req) in st.require_suites.iter().enumerate() {
                    if suites.contains_key(&req.suite) {
                        continue;
                    }
                    let at = format!("rollouts.{}.stages[{i}].require_suites[{j}]", r.name);
                    match crate::eval::load_suite(base_dir, &req.suite) {
                        Ok(suite) => {
                            for e in crate::eval::check_suite(&suite, &config) {
                                errors.push(format!("{at}: {e}"));
                            }
                            suites.insert(req.suite.clone(), Arc::new(suite));
                        }
                        Err(e) => errors.push(format!("{at}: {e}")),
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Snapshot {
            config,
            deployments,
            providers,
            keys,
            admin_tokens,
            principles: compiled,
            base_dir: base_dir.map(Path::to_path_buf),
            suites,
        })
    }

    /// Finds the key whose digest matches, comparing every configured digest
    /// in constant time so timing reveals nothing about near misses.
    pub fn authenticate(&self, presented: &str) -> Option<&ApiKey> {
        let d = digest(presented);
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&d)) {
                found = Some(k);
            }
        }
        found
    }

    /// Finds the admin token that matches, in constant time per token.
    pub fn authenticate_admin(&self, presented: &str) -> Option<&AdminToken> {
        let d = digest(presented);
        let mut found = None;
        for t in &self.admin_tokens {
            if bool::from(t.digest.ct_eq(&d)) {
                found = Some(t);
            }
        }
        found
    }
}
