//! Between the tcp core's types and the edge messages that carry them.

use capnet_proto::app::SocketError;
use capnet_proto::edge::Opt;

/// A tcp core option as the edge carries it.
pub fn opt(o: capnet_tcp::SockOpt) -> Opt {
    match o {
        capnet_tcp::SockOpt::NoDelay(on) => Opt::NoDelay(on),
        capnet_tcp::SockOpt::DelayedAck(on) => Opt::DelayedAck(on),
        capnet_tcp::SockOpt::KeepAlive(k) => {
            Opt::KeepAlive(k.map(|k| (k.idle.total_millis(), k.interval.total_millis(), k.count)))
        }
        capnet_tcp::SockOpt::CongestionControl(a) => Opt::CongestionControl(a.name().into()),
    }
}

/// An option from the edge, for the tcp core (an unknown algorithm name is `Invalid`).
pub fn sock_opt(o: &Opt) -> Result<capnet_tcp::SockOpt, SocketError> {
    Ok(match o {
        Opt::NoDelay(on) => capnet_tcp::SockOpt::NoDelay(*on),
        Opt::DelayedAck(on) => capnet_tcp::SockOpt::DelayedAck(*on),
        Opt::KeepAlive(k) => capnet_tcp::SockOpt::KeepAlive(k.map(|(idle, interval, count)| capnet_tcp::Keepalive {
            idle: capnet_tcp::Duration::from_millis(idle),
            interval: capnet_tcp::Duration::from_millis(interval),
            count,
        })),
        Opt::CongestionControl(name) => {
            capnet_tcp::SockOpt::CongestionControl(name.parse().map_err(SocketError::Invalid)?)
        }
    })
}

/// Readiness as bits.
pub fn ready_bits(r: capnet_tcp::Ready) -> u8 {
    u8::from(r.readable) | u8::from(r.writable) << 1 | u8::from(r.error) << 2 | u8::from(r.hup) << 3
}

/// Readiness from bits.
pub fn ready_from(b: u8) -> capnet_tcp::Ready {
    capnet_tcp::Ready { readable: b & 1 != 0, writable: b & 2 != 0, error: b & 4 != 0, hup: b & 8 != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_bits_round_trip() {
        for b in 0..16 {
            assert_eq!(ready_bits(ready_from(b)), b);
        }
    }

    #[test]
    fn options_convert_both_ways() {
        let opts = [
            capnet_tcp::SockOpt::NoDelay(true),
            capnet_tcp::SockOpt::DelayedAck(false),
            capnet_tcp::SockOpt::KeepAlive(None),
            capnet_tcp::SockOpt::CongestionControl(capnet_tcp::cc::Algorithm::Cubic),
        ];
        for o in opts {
            assert_eq!(sock_opt(&opt(o)), Ok(o));
        }
        assert!(matches!(sock_opt(&Opt::CongestionControl("vegas".into())), Err(SocketError::Invalid(_))));
    }
}
