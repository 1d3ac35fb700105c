//! In-flight requests of one queue, by descriptor head: which heads are
//! outstanding, in the order they were taken from the avail ring. A head
//! the driver offers again while it is outstanding is refused (completing
//! it would complete the first one too), and a teardown names what was
//! left.

/// The outstanding heads of one queue, in one ring generation (see
/// [`crate::queue`]): a new generation starts a new record, since the
/// frontend may offer the old heads again.
#[derive(Debug, Default)]
pub struct InFlight {
    /// `order[head]` is the submission counter of an outstanding head.
    order: Vec<Option<u64>>,
    next: u64,
    count: usize,
    generation: u64,
}

impl InFlight {
    /// Records `head` as taken in `generation`. False when it is already
    /// outstanding: a driver bug, after which the chain must not be
    /// completed twice.
    pub fn start(&mut self, head: u16, generation: u64) -> bool {
        if generation != self.generation {
            *self = InFlight {
                generation,
                ..InFlight::default()
            };
        }
        let i = usize::from(head);
        if i >= self.order.len() {
            self.order.resize(i + 1, None);
        }
        if self.order[i].is_some() {
            return false;
        }
        self.order[i] = Some(self.next);
        self.next += 1;
        self.count += 1;
        true
    }

    /// Records `head`, taken in `generation`, as completed.
    pub fn finish(&mut self, head: u16, generation: u64) {
        if generation != self.generation {
            return;
        }
        if let Some(slot) = self.order.get_mut(usize::from(head)) {
            if slot.take().is_some() {
                self.count -= 1;
            }
        }
    }

    /// How many heads are outstanding.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Outstanding heads, oldest first: the order to resubmit them in.
    pub fn oldest_first(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = self
            .order
            .iter()
            .enumerate()
            .filter_map(|(h, o)| Some(((*o)?, h as u16)))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_heads_in_submission_order() {
        let mut f = InFlight::default();
        assert!(f.start(5, 0));
        assert!(f.start(2, 0));
        assert!(f.start(9, 0));
        assert!(!f.start(2, 0), "a head already outstanding is refused");
        assert_eq!(f.len(), 3);
        f.finish(2, 0);
        f.finish(2, 0);
        assert_eq!(f.len(), 2, "finishing twice counts once");
        assert!(f.start(2, 0));
        assert_eq!(f.oldest_first(), [5, 9, 2]);
        f.finish(5, 0);
        f.finish(9, 0);
        f.finish(2, 0);
        assert!(f.is_empty());
    }

    #[test]
    fn a_new_generation_forgets_the_old_heads() {
        let mut f = InFlight::default();
        assert!(f.start(3, 0));
        assert!(f.start(3, 1), "the frontend may offer head 3 again");
        f.finish(3, 0);
        assert_eq!(f.len(), 1, "a stale completion does not finish the new one");
        f.finish(3, 1);
        assert!(f.is_empty());
    }
}
