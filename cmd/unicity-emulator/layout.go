package main

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"syscall"
)

// The hubs' layout. Azure names a hub by a host name alone ({hub}.azure-devices.net, MQTT on
// 8883, WebSocket on 443), and some SDKs cannot take a port in assignedHub (Microsoft's
// WebSocket transports dial wss://{assignedHub}:443). So by default each hub gets a loopback
// address of its own, 127.X.Y.2, 127.X.Y.3, …, where it listens on 8883 and 443, and is named
// by that address: a name every resolver knows (no /etc/hosts entry, no DNS) and that its
// certificate covers. X.Y is drawn at random on the first serve of a directory, so that
// emulators of other directories on the machine do not collide, and kept with the state, so
// that hub names survive restarts. Binding 443 takes root or CAP_NET_BIND_SERVICE; without
// it a hub's WebSocket listens on a free port of its address. Where loopback addresses
// other than 127.0.0.1 cannot be bound (not Linux), or with --hub-host, a hub listens on a free
// port and is named host:port.

const (
	mqttPort      = "8883"
	webSocketPort = "443"
)

// hubListener is where one hub serves and the host devices reach it by; the hub's name is
// the host, with the port unless it is 8883 (hubtest.NewNamed).
type hubListener struct {
	host  string
	l, ws net.Listener // ws is nil without WebSocket
}

func (h hubListener) name() string {
	if _, port, _ := net.SplitHostPort(h.l.Addr().String()); port != mqttPort {
		return net.JoinHostPort(h.host, port)
	}
	return h.host
}

func (h hubListener) record() hubLayoutRecord {
	r := hubLayoutRecord{Name: h.name(), Addr: h.l.Addr().String()}
	if h.ws != nil {
		r.WS = h.ws.Addr().String()
	}
	return r
}

func (h hubListener) close() {
	h.l.Close()
	if h.ws != nil {
		h.ws.Close()
	}
}

// hubLayout is what decides where the hubs listen.
type hubLayout struct {
	addrs, wsAddrs []string          // the flags, by hub
	host           string            // --hub-host, "" to name hubs by their address
	recorded       []hubLayoutRecord // of the last serve of this directory
	warn           io.Writer
}

// listen opens the listeners of n hubs. A hub named in the recorded layout listens where it
// did, or the call fails: devices know it by that name.
func (lay hubLayout) listen(n int) ([]hubListener, error) {
	var out []hubListener
	var base []byte // 127.X.Y, drawn once
	for i := range n {
		h, err := lay.listenHub(i, &base)
		if err != nil {
			for _, o := range out {
				o.close()
			}
			return nil, err
		}
		out = append(out, h)
	}
	return out, nil
}

func (lay hubLayout) listenHub(i int, base *[]byte) (hubListener, error) {
	addr := at(lay.addrs, i)
	var (
		l   net.Listener
		err error
	)
	switch {
	case addr != "":
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(addr, mqttPort) // a host alone, as Azure names a hub
		}
		if l, err = net.Listen("tcp", addr); err != nil {
			return hubListener{}, fmt.Errorf("cannot listen for IoT Hub: %w", err)
		}
	case i < len(lay.recorded):
		r := lay.recorded[i]
		if l, err = net.Listen("tcp", r.Addr); err != nil {
			return hubListener{}, fmt.Errorf("cannot serve hub %s on %s again: %w (devices know the hub by that name: free the address, or start over in a new --dir)", r.Name, r.Addr, err)
		}
	case lay.host != "":
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return hubListener{}, fmt.Errorf("cannot listen for IoT Hub: %w", err)
		}
	default:
		if l, err = listenLoopback(i, base); err != nil {
			fmt.Fprintf(lay.warn, "unicity-emulator serve: hub %d: %v; it listens on a free port of 127.0.0.1 and its name has the port, which Azure's never have\n", i+1, err)
			if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
				return hubListener{}, fmt.Errorf("cannot listen for IoT Hub: %w", err)
			}
		}
	}
	h := hubListener{host: hostOf(lay.host, l.Addr()), l: l}
	if h.ws, err = lay.listenWebSocket(i, h); err != nil {
		l.Close()
		return hubListener{}, err
	}
	return h, nil
}

// listenLoopback listens on 127.X.Y.(2+i):8883, drawing X.Y the first time.
func listenLoopback(i int, base *[]byte) (net.Listener, error) {
	var last error
	for range 5 {
		if *base == nil {
			x, _ := rand.Int(rand.Reader, big.NewInt(254))
			y, _ := rand.Int(rand.Reader, big.NewInt(256))
			*base = []byte{127, byte(x.Int64() + 1), byte(y.Int64())}
		}
		if i > 252 {
			return nil, errors.New("no more than 253 hubs have loopback addresses of their own")
		}
		ip := net.IPv4((*base)[0], (*base)[1], (*base)[2], byte(2+i))
		l, err := net.Listen("tcp", net.JoinHostPort(ip.String(), mqttPort))
		if err == nil {
			return l, nil
		}
		last = err
		if !errors.Is(err, syscall.EADDRINUSE) || i > 0 {
			break // no such address here, or the other hubs are already on this base
		}
		*base = nil // taken by someone else: another draw
	}
	return nil, fmt.Errorf("cannot listen on a loopback address of its own: %w", last)
}

// listenWebSocket opens a hub's WebSocket listener: on the --hub-ws-addr address when given
// ("-": none), else where it was (best effort: the WebSocket address is not in the hub's
// name), else on 443 of a hub's own address, else on a free port.
func (lay hubLayout) listenWebSocket(i int, h hubListener) (net.Listener, error) {
	switch addr := at(lay.wsAddrs, i); {
	case addr == "-":
		return nil, nil
	case addr != "":
		ws, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("cannot listen for IoT Hub WebSocket: %w", err)
		}
		return ws, nil
	case i < len(lay.recorded) && lay.recorded[i].WS != "":
		if ws, err := net.Listen("tcp", lay.recorded[i].WS); err == nil {
			return ws, nil
		}
	}
	ip, port, _ := net.SplitHostPort(h.l.Addr().String())
	if port == mqttPort && ip != "127.0.0.1" && lay.host == "" {
		ws, err := net.Listen("tcp", net.JoinHostPort(ip, webSocketPort))
		if err == nil {
			return ws, nil
		}
		if ws, err2 := net.Listen("tcp", net.JoinHostPort(ip, "0")); err2 == nil {
			fmt.Fprintf(lay.warn, "unicity-emulator serve: hub %s: cannot listen on %s (%v; port 443 takes root or CAP_NET_BIND_SERVICE): its WebSocket is on %s, where SDKs that dial wss://%s:443 do not look\n",
				h.name(), net.JoinHostPort(ip, webSocketPort), err, ws.Addr(), h.name())
			return ws, nil
		}
	}
	ws, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("cannot listen for IoT Hub WebSocket: %w", err)
	}
	return ws, nil
}

// hostOf is the host devices reach a hub listening on addr by: host when given, else the
// listening address, or localhost for 127.0.0.1 and the any-address.
func hostOf(host string, addr net.Addr) string {
	if host != "" {
		return host
	}
	ip, _, _ := net.SplitHostPort(addr.String())
	if a := net.ParseIP(ip); a == nil || a.IsUnspecified() || a.Equal(net.IPv4(127, 0, 0, 1)) {
		return "localhost"
	}
	return ip
}
