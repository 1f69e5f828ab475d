//! Peer authentication on the replica port (DRBD's `cram-hmac-alg` with a
//! `shared-secret`). With a cluster secret (`serve --cluster-secret-file`),
//! both ends of every connection prove that they hold it before a replica
//! is opened or a forwarded request runs: the client's Hello carries a
//! fresh nonce, the server answers with its own and an HMAC over both and
//! its node name, and the client answers with an HMAC over both nonces and
//! the Hello it sent. The secret never crosses the network; a proof is
//! good for one connection only. It authenticates peers and what they ask;
//! it does not encrypt the stream (keep replica traffic on a private
//! network, or under WireGuard or IPsec).
//!
//! The key is the node's, set once at start ([`install`]): every link of
//! the process uses it, whichever code path opens it.

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::sync::OnceLock;
use zeroize::Zeroizing;

/// Bytes of a nonce, and of a proof (HMAC-SHA256).
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
pub type Nonce = [u8; NONCE_LEN];
pub type Proof = [u8; PROOF_LEN];

/// Separates this key from any other use of the same secret.
const HKDF_SALT: &[u8] = b"dunnage cluster secret";
const HKDF_INFO: &[u8] = b"replica link authentication v1";
const SERVER: &[u8] = b"dunnage replica server proof";
const CLIENT: &[u8] = b"dunnage replica client proof";

static KEY: OnceLock<ClusterKey> = OnceLock::new();

/// The key this node proves the cluster secret with.
pub struct ClusterKey(Zeroizing<[u8; 32]>);

impl ClusterKey {
    pub fn derive(secret: &[u8]) -> ClusterKey {
        let mut key = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(HKDF_SALT), secret)
            .expand(HKDF_INFO, &mut *key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        ClusterKey(key)
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&*self.0)
            .expect("HMAC takes a key of any length");
        mac.update(label);
        // Each part length-prefixed: no two inputs read the same.
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// What the server named `node` answers a Hello carrying `client`.
    pub fn server_proof(&self, client: &Nonce, server: &Nonce, node: &str) -> Proof {
        self.mac(SERVER, &[client, server, node.as_bytes()])
            .finalize()
            .into_bytes()
            .into()
    }

    pub fn verify_server(&self, client: &Nonce, server: &Nonce, node: &str, proof: &[u8]) -> bool {
        self.mac(SERVER, &[client, server, node.as_bytes()])
            .verify_slice(proof)
            .is_ok()
    }

    /// What the client answers the server's challenge with: it sent
    /// `hello` (the encoded Hello frame).
    pub fn client_proof(&self, server: &Nonce, client: &Nonce, hello: &[u8]) -> Proof {
        self.mac(CLIENT, &[server, client, hello])
            .finalize()
            .into_bytes()
            .into()
    }

    pub fn verify_client(
        &self,
        server: &Nonce,
        client: &Nonce,
        hello: &[u8],
        proof: &[u8],
    ) -> bool {
        self.mac(CLIENT, &[server, client, hello])
            .verify_slice(proof)
            .is_ok()
    }
}

/// Set this node's cluster secret, once, before any link opens.
pub fn install(secret: &[u8]) -> Result<(), &'static str> {
    KEY.set(ClusterKey::derive(secret))
        .map_err(|_| "the cluster secret is set already")
}

/// This node's key, if it was started with a cluster secret.
pub fn key() -> Option<&'static ClusterKey> {
    KEY.get()
}

pub fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_secret_nonces_node_and_hello() {
        let k = ClusterKey::derive(b"correct horse");
        let other = ClusterKey::derive(b"battery staple");
        let (c, s) = (nonce(), nonce());
        assert_ne!(c, s);
        let p = k.server_proof(&c, &s, "n2");
        assert!(k.verify_server(&c, &s, "n2", &p));
        assert!(!other.verify_server(&c, &s, "n2", &p), "another secret");
        assert!(!k.verify_server(&c, &s, "n3", &p), "another node");
        assert!(!k.verify_server(&s, &c, "n2", &p), "nonces swapped");
        assert!(!k.verify_server(&c, &nonce(), "n2", &p), "a replayed proof");
        assert!(!k.verify_server(&c, &s, "n2", &p[..31]), "cut short");

        let hello = b"hello bytes";
        let p = k.client_proof(&s, &c, hello);
        assert!(k.verify_client(&s, &c, hello, &p));
        assert!(!other.verify_client(&s, &c, hello, &p));
        assert!(
            !k.verify_client(&s, &c, b"hello bytez", &p),
            "another Hello"
        );
        // A server's proof is never a client's (labels differ).
        let sp = k.server_proof(&c, &s, "");
        assert!(!k.verify_client(&s, &c, b"", &sp));
    }
}
