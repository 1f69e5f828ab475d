//! The cluster's control plane, kept in etcd: the catalog, node membership
//! (lease-backed keys) and attach ownership (a lease-backed key whose
//! revision is the volume's generation). A single node needs none of it.
