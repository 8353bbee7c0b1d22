//! The routing table: connected subnet, static routes, default gateway. Longest
//! prefix wins.

use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

/// One route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destinations it covers.
    pub dest: Ipv4Cidr,
    /// `None`: directly connected (the next hop is the destination itself).
    pub via: Option<Ipv4Address>,
}

/// The routing table.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// The connected subnet of `addr`, and a default route via `gateway`.
    pub fn connected(addr: Ipv4Cidr, gateway: Option<Ipv4Address>) -> Self {
        let mut t = Self::default();
        t.add(Route { dest: Ipv4Cidr::new(addr.network().address(), addr.prefix_len()), via: None });
        if let Some(gw) = gateway {
            t.add(Route { dest: Ipv4Cidr::new(Ipv4Address::UNSPECIFIED, 0), via: Some(gw) });
        }
        t
    }

    /// Adds a route.
    pub fn add(&mut self, route: Route) {
        self.routes.push(route);
    }

    /// Every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The next hop for `dst`: the longest matching prefix's gateway, or `dst`
    /// itself when connected. The limited broadcast goes out directly.
    pub fn next_hop(&self, dst: Ipv4Address) -> Option<Ipv4Address> {
        if dst.is_broadcast() {
            return Some(dst);
        }
        self.routes
            .iter()
            .filter(|r| r.dest.contains_addr(&dst))
            .max_by_key(|r| r.dest.prefix_len())
            .map(|r| r.via.unwrap_or(dst))
    }
}
