//! A link: one domain's message channel to a domain of another group, typed
//! by the edge's two message types ([`capnet_proto::edge`]): a `Link<O, I>`
//! sends only `O` and hands on only what validates as `I`.
//!
//! Sends never block the group: a message the channel cannot take now waits in
//! the link's outbox, in order. A [`Link::call`] (the sockets domain calling a
//! transport in another process) is the one place a group waits for a peer: it
//! sends the call, then takes messages until the answer with its id arrives,
//! keeping the others for the group's next round. A peer that breaks the
//! channel, sends garbage, or does not answer within [`CALL_DEADLINE`] breaks the
//! link for good: the group reports it (and the supervisor will cut the peer off).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use std::sync::Arc;

use capnet_ipc::control::{decode, encode_with};
use capnet_ipc::lent::{Chain, Ledger, Lent, PoolKey, Returns, Views};
use capnet_ipc::msg::MsgEnd;
use capnet_ipc::notify::SpinPolicy;
use capnet_ipc::shm_channel::ShmEnd;
use capnet_ipc::{Interest, Waiter};
use capnet_proto::app::SocketError;

use capnet_proto::edge::{Answer, Answers, Calls, EdgeMsg, Payload};
use capnet_proto::Kind;

/// How long a call waits for its answer before the link counts as broken: a
/// transport answers in microseconds, so this is only ever spent on a dead one
/// (the application then sees `ConnectionReset` within it).
pub const CALL_DEADLINE: Duration = Duration::from_secs(1);

/// Messages an outbox holds for a peer that does not read (one that died and
/// is being restarted, say); beyond this, new ones are dropped and counted —
/// TCP's retransmission covers what was in flight.
pub const MAX_OUTBOX: usize = 4096;

/// One end of a channel to another group's domain: it sends `O` and receives `I`.
#[derive(Debug)]
pub struct Link<O, I> {
    /// The local domain this end belongs to.
    pub local: Kind,
    /// The domain at the other end.
    pub remote: Kind,
    end: MsgEnd,
    outbox: VecDeque<Vec<u8>>,
    /// Messages that arrived while a call waited for its answer.
    deferred: VecDeque<I>,
    sends: PhantomData<fn(O)>,
    waiter: Waiter,
    next_id: u64,
    /// Why the link is broken, once it is.
    broken: Option<String>,
    /// An activity notice went out and no call has come since (transport side).
    pub activity_sent: bool,
    /// Messages dropped because the outbox was full.
    dropped: u64,
    /// Calls and asks (`WantPush`) sent: what the peer answers.
    asks: u64,
    /// The peer is being replaced (restart or swap): sends are dropped and
    /// calls fail at once until the new channel takes this one's place.
    pub replacing: bool,
    /// What the peer may still send unasked (sockets side): see [`Unasked`].
    pub unasked: Unasked,
    /// Which tcp domain this link reaches, when a swap runs two (the sockets
    /// domain tags the socket ids it holds with it).
    pub tag: u8,
    /// The peer is a tcp domain being swapped out: it finishes the connections
    /// it has and gets no new ones.
    pub retiring: bool,
    /// What a call does instead of sleeping while it waits for its answer: run
    /// the peer's group, when it lives in this thread ([`crate::fake`]).
    pub(crate) idle: Option<Idle>,
    /// What we lent the peer, by ticket, until it gives each back.
    lent: Ledger,
    /// Loans made to the peer so far.
    loans_made: u64,
    /// Where the loans the peer made us go when read.
    returns: Arc<Returns>,
    tickets: Vec<u64>,
}

/// Loans a peer may hold of one link at once: the driver's quota toward the
/// stack group, which is what can be lent on.
pub const LINK_LOAN_QUOTA: usize = 768;

/// Payload shorter than this crosses a link inside the message, not lent: a
/// loan and its return are two ring entries more, dearer than copying a few
/// hundred bytes (a 1-byte request/response took 14 entries a transaction
/// with every segment lent).
pub const INLINE_BELOW: usize = 256;

/// A fake graph's other groups, run one round while a call waits.
#[derive(Clone)]
pub(crate) struct Idle(pub std::sync::Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Idle")
    }
}

/// What a transport may send the sockets domain without being asked, counted
/// exactly (sockets side), so that no load a correct transport produces is
/// taken for a flood, while a flood is still bounded by the sockets domain's own
/// calls.
///
/// A transport sends one activity notice and then no other until a call or an
/// ask (`WantPush`) of ours has reached it: so it may send at most one notice
/// more than we sent calls and asks. And it pushes once per `WantPush`; a push
/// for a receive we no longer expect (the socket was closed while the push was
/// on its way) is allowed once for every expected push we dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unasked {
    notices: u64,
    stray_pushes: u64,
}

impl Default for Unasked {
    fn default() -> Self {
        Self { notices: 1, stray_pushes: 0 }
    }
}

impl Unasked {
    /// We sent a call or an ask: one more notice may come after it.
    pub fn asked(&mut self) {
        self.notices += 1;
    }

    /// A notice arrived: whether the protocol allowed it.
    pub fn notice(&mut self) -> bool {
        self.notices.checked_sub(1).map(|n| self.notices = n).is_some()
    }

    /// We stopped expecting a push we asked for: it may still arrive.
    pub fn push_dropped(&mut self) {
        self.stray_pushes += 1;
    }

    /// A push nobody expects arrived: whether it is one we dropped.
    pub fn stray_push(&mut self) -> bool {
        self.stray_pushes.checked_sub(1).map(|n| self.stray_pushes = n).is_some()
    }
}

impl<O: EdgeMsg, I: EdgeMsg> Link<O, I> {
    /// A link over `end` from `O`'s sender to its receiver.
    pub fn new(end: MsgEnd) -> Self {
        Self {
            local: O::FROM,
            remote: O::TO,
            end,
            outbox: VecDeque::new(),
            deferred: VecDeque::new(),
            sends: PhantomData,
            waiter: Waiter::new(SpinPolicy::DEFAULT),
            next_id: 1,
            broken: None,
            activity_sent: false,
            dropped: 0,
            asks: 0,
            replacing: false,
            unasked: Unasked::default(),
            tag: 0,
            retiring: false,
            idle: None,
            lent: Ledger::new(LINK_LOAN_QUOTA),
            loans_made: 0,
            returns: Returns::new(),
            tickets: Vec::new(),
        }
    }

    /// `data` for the peer: each handle on a pool lent to us whose generation
    /// `current` says the peer views (the driver's frame pool, which the
    /// supervisor grants the peer too) lent on, the others (our own bytes)
    /// copied between the loans, when the peer's quota allows (it keeps them
    /// until it gives them back); else — or when it is shorter than
    /// [`INLINE_BELOW`] — all copied into the message.
    pub fn lend(&mut self, data: &Chain, current: impl Fn(PoolKey) -> bool) -> Payload {
        let lendable = |l: &Lent| l.borrowed() && l.pool_key().is_some_and(&current);
        let loans = (data.len() >= INLINE_BELOW).then(|| self.lent.lend_chain(data, lendable)).flatten();
        self.loans_made += loans.as_ref().map_or(0, |p| p.iter().filter(|p| p.loan().is_some()).count() as u64);
        Payload::lent_or_copied(data, loans)
    }

    /// A segment for the peer as its header and its payload: the leading
    /// handles of our own (the header we wrote) copied out to go inline
    /// (counted as header bytes), the rest lent or copied as [`Link::lend`]
    /// does.
    pub fn lend_headed(&mut self, mut data: Chain, current: impl Fn(PoolKey) -> bool) -> (Vec<u8>, Payload) {
        let n = data.iter().take_while(|l| !l.borrowed()).map(Lent::len).sum();
        let mut head = vec![0; n];
        data.split_to(n).peek(0, &mut head);
        (head, self.lend(&data, current))
    }

    /// A payload from the peer as handles: its bytes, or the buffers it lent
    /// us (checked against `views`), given back when the last handle drops.
    pub fn borrow(&self, p: Payload, views: &Views) -> Result<Chain, String> {
        p.into_chain(views, &self.returns).map_err(|e| format!("it lent a buffer we may not read: {e}"))
    }

    /// Why the link broke, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// The peer sent something it may not send on this channel: the link is
    /// broken from now on.
    pub fn protocol_error(&mut self, why: String) {
        self.breaks(why);
    }

    fn breaks(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(format!("the channel from {} to {} broke: {why}", self.local, self.remote));
        }
    }

    /// The channel end, to wait on (interested in space too while the outbox
    /// holds messages).
    pub fn channel(&mut self) -> &mut ShmEnd {
        let want = if self.outbox.is_empty() { Interest::RX } else { Interest::BOTH };
        let ch = self.end.channel();
        ch.interest = want;
        ch
    }

    /// Its counters for `capnet status`, named `link_REMOTE_…`: messages sent and
    /// received, futex wakes made for the peer, messages waiting in the ring for
    /// us and in our outbox for room, our sleeps while a call waited, the
    /// calls and asks we sent, and the loans the peer holds and we made.
    pub fn counters(&mut self) -> Vec<(String, u64)> {
        let outbox = self.outbox.len() as u64;
        let sleeps = self.waiter.stats.sleeps;
        let ch = self.end.channel();
        let waiting = ch.pending().unwrap_or(0) as u64;
        let st = ch.stats;
        let r = self.remote;
        vec![
            (format!("link_{r}_sent"), st.sent),
            (format!("link_{r}_received"), st.received),
            (format!("link_{r}_futex_wakes"), st.wakes),
            (format!("link_{r}_ring_waiting"), waiting),
            (format!("link_{r}_outbox"), outbox),
            (format!("link_{r}_call_sleeps"), sleeps),
            (format!("link_{r}_violations"), st.violations),
            (format!("link_{r}_dropped"), self.dropped),
            (format!("link_{r}_calls"), self.asks),
            (format!("link_{r}_lent"), self.lent.out() as u64),
            (format!("link_{r}_loans_made"), self.loans_made),
        ]
    }

    /// Writes garbage over this end's channel indices: the hostile mode of a
    /// test (what a compromised domain could do to the area it owns).
    #[cfg(feature = "hostile")]
    pub fn scribble(&mut self, garbage: u32) {
        self.end.channel().scribble(garbage);
    }

    /// Sends the peer a return of a loan it never made: the hostile mode of a
    /// test (the peer's pool refuses it and the peer breaks the link).
    #[cfg(feature = "hostile")]
    pub fn return_foreign_loan(&mut self) {
        // Our end is A when our kind comes first; the peer's pool is its end's + 1.
        let peer_pool = if self.local < self.remote { 2 } else { 1 };
        let d = capnet_ipc::Descriptor {
            pool: peer_pool,
            flags: capnet_ipc::Descriptor::RETURN,
            index: 7,
            offset: 0,
            len: 64,
        };
        let _ = self.end.channel().send(&[d]);
    }

    /// Sends `msg` `n` times as fast as the channel takes it, for at most two
    /// seconds, taking back its buffers (and dropping whatever the peer sends)
    /// when the channel is full: the hostile mode of a test (a flood of
    /// activity notices, of answers to no call, of pushes nobody asked for).
    #[cfg(feature = "hostile")]
    pub fn flood(&mut self, msg: &O, n: usize) {
        let until = Instant::now() + Duration::from_secs(2);
        let mut sent = 0;
        while sent < n && Instant::now() < until {
            let mut full = false;
            let _ = encode_with(msg, |bytes| match self.end.send(bytes) {
                Ok(true) => sent += 1,
                _ => full = true,
            });
            if full {
                let _ = self.end.recv(|_| {});
                std::thread::yield_now();
            }
        }
    }

    /// Whether messages wait for room (or for the answer to a call).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Sends `msg`: straight into the channel when nothing waits before it, else
    /// after what waits.
    pub fn send(&mut self, msg: &O) {
        if self.broken.is_some() || self.replacing {
            self.dropped += u64::from(self.replacing);
            return;
        }
        let (outbox, end, dropped) = (&mut self.outbox, &mut self.end, &mut self.dropped);
        let queued = !outbox.is_empty();
        let mut failed = None;
        let mut keep = |bytes: &[u8]| {
            if outbox.len() < MAX_OUTBOX {
                outbox.push_back(bytes.to_vec());
            } else {
                *dropped += 1;
            }
        };
        let r = encode_with(msg, |bytes| {
            if queued {
                keep(bytes);
                return;
            }
            match end.send(bytes) {
                Ok(true) => {}
                Ok(false) => keep(bytes),
                Err(e) => failed = Some(e.to_string()),
            }
        });
        if let Err(e) = r {
            failed = Some(e.to_string());
        }
        if let Some(why) = failed {
            self.breaks(why);
        }
    }

    /// Pushes what waits in the outbox, as far as the channel takes it, and
    /// gives back the loans we were made and have read.
    pub fn flush(&mut self) {
        self.returns.take(&mut self.tickets);
        if !self.tickets.is_empty() && self.broken.is_none() {
            if let Err(e) = self.end.return_loans(&self.tickets) {
                self.breaks(e.to_string());
            }
        }
        self.tickets.clear();
        while let Some(m) = self.outbox.front() {
            match self.end.send(m) {
                Ok(true) => {
                    self.outbox.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    self.breaks(e.to_string());
                    break;
                }
            }
        }
    }

    /// Takes every message waiting (those kept during a call first), handing each
    /// to `each`. A message that fails validation breaks the link.
    pub fn recv(&mut self, mut each: impl FnMut(&mut Self, I)) {
        while let Some(m) = self.deferred.pop_front() {
            each(self, m);
        }
        for m in self.take() {
            each(self, m);
        }
    }

    /// Copies out and validates every message in the channel (none once broken).
    fn take(&mut self) -> Vec<I> {
        let mut got = Vec::new();
        if self.broken.is_some() {
            return got;
        }
        let mut garbage = None;
        if let Err(e) = self.end.recv(|bytes| match decode::<I>(bytes) {
            Ok(m) => got.push(m),
            Err(e) => garbage = Some(e.to_string()),
        }) {
            self.breaks(e.to_string());
        }
        let mut back = Vec::new();
        self.end.take_returned_loans(&mut back);
        if let Some(e) = back.into_iter().find_map(|t| self.lent.returned(t).err()) {
            self.breaks(format!("it gave back a loan it does not hold: {e}"));
            return Vec::new();
        }
        if let Some(why) = garbage {
            self.breaks(format!("a message that is not one of {} → {}: {why}", I::FROM, I::TO));
            got.clear();
        }
        got
    }

    /// Sends a one-way request that the peer answers in its own time (sockets →
    /// tcp: `WantPush`): like a call, it asks, so notices the peer sent before
    /// it were asked for.
    pub fn ask(&mut self, msg: &O) {
        self.asks += 1;
        self.unasked.asked();
        self.send(msg);
    }

    /// Calls the remote domain and waits for its answer (sockets → transport).
    /// A broken link, or one whose peer does not answer in time, is `Reset`:
    /// to the application the connection is gone.
    pub fn call<C>(&mut self, call: C) -> Result<Answer, SocketError>
    where
        O: Calls<C>,
        I: Answers,
    {
        if self.replacing {
            return Err(SocketError::Reset);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.asks += 1;
        self.unasked.asked();
        self.send(&O::call(id, call));
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            self.flush();
            if self.broken.is_some() {
                return Err(SocketError::Reset);
            }
            let mut answer = None;
            let got = self.take();
            for m in got {
                match m.into_answer() {
                    Ok((i, a)) if i == id => answer = Some(a),
                    Ok((i, a)) => self.deferred.push_back(I::answer(i, a)),
                    Err(other) => self.deferred.push_back(other),
                }
            }
            if let Some(a) = answer {
                return a;
            }
            if self.broken.is_some() {
                return Err(SocketError::Reset);
            }
            let now = Instant::now();
            if now >= deadline {
                self.breaks(format!("{} did not answer a call within {CALL_DEADLINE:?}", self.remote));
                return Err(SocketError::Reset);
            }
            if let Some(idle) = &self.idle {
                (idle.0)();
                continue;
            }
            let want = if self.outbox.is_empty() { Interest::RX } else { Interest::BOTH };
            let ch = self.end.channel();
            ch.interest = want;
            self.waiter.wait(&mut [ch], Some(deadline - now), crate::tokens());
        }
    }
}

/// What every link does whatever its edge: for the group's loop (waiting,
/// flushing, reporting) and the supervisor's relinking.
pub trait AnyLink: std::fmt::Debug {
    /// The local domain.
    fn local(&self) -> Kind;
    /// The domain at the other end.
    fn remote(&self) -> Kind;
    /// The peer is a tcp domain being swapped out.
    fn retiring(&self) -> bool;
    /// Why the link broke, if it did.
    fn broken(&self) -> Option<&str>;
    /// The channel end, to wait on.
    fn channel(&mut self) -> &mut ShmEnd;
    /// Its counters for `capnet status`.
    fn counters(&mut self) -> Vec<(String, u64)>;
    /// Pushes what waits in the outbox.
    fn flush(&mut self);
    /// The peer is being replaced: drop sends and fail calls until it is.
    fn set_replacing(&mut self, on: bool);
    /// Hostile mode: garbage over this end's indices.
    #[cfg(feature = "hostile")]
    fn scribble(&mut self, garbage: u32);
    /// Hostile mode: a return of a loan the peer never made.
    #[cfg(feature = "hostile")]
    fn return_foreign_loan(&mut self);
}

impl<O: EdgeMsg, I: EdgeMsg> AnyLink for Link<O, I> {
    fn local(&self) -> Kind {
        self.local
    }
    fn remote(&self) -> Kind {
        self.remote
    }
    fn retiring(&self) -> bool {
        self.retiring
    }
    fn broken(&self) -> Option<&str> {
        Link::broken(self)
    }
    fn channel(&mut self) -> &mut ShmEnd {
        Link::channel(self)
    }
    fn counters(&mut self) -> Vec<(String, u64)> {
        Link::counters(self)
    }
    fn flush(&mut self) {
        Link::flush(self)
    }
    fn set_replacing(&mut self, on: bool) {
        self.replacing = on;
    }
    #[cfg(feature = "hostile")]
    fn scribble(&mut self, garbage: u32) {
        Link::scribble(self, garbage)
    }
    #[cfg(feature = "hostile")]
    fn return_foreign_loan(&mut self) {
        Link::return_foreign_loan(self)
    }
}

#[cfg(test)]
mod tests {
    use super::Unasked;

    #[test]
    fn notices_are_bounded_by_calls_exactly() {
        let mut u = Unasked::default();
        assert!(u.notice(), "one notice before any call");
        assert!(!u.notice(), "a second one unasked is a flood");
        let mut u = Unasked::default();
        // Many calls in a row, each answered by a notice that waits behind the
        // next call: all of them are the protocol's.
        for _ in 0..10_000 {
            u.asked();
        }
        assert!((0..10_001).all(|_| u.notice()));
        assert!(!u.notice(), "one more than the calls allow");
    }

    #[test]
    fn a_stray_push_needs_a_dropped_expectation() {
        let mut u = Unasked::default();
        assert!(!u.stray_push(), "a push for a receive never asked");
        u.push_dropped();
        assert!(u.stray_push(), "the push of a receive closed while it travelled");
        assert!(!u.stray_push());
    }
}
