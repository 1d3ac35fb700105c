//! What a consistency check found, in `qemu-img check`'s terms.

/// What a check found (and fixed), in `qemu-img check`'s terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references, or bad entries.
    pub corruptions: u64,
    /// Refcounts higher than the references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped part of the check.
    pub check_errors: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem.
    pub messages: Vec<String>,
}
