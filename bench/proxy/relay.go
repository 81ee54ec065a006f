package proxy

import (
	"net"
	"sync"
)

// relay accepts connections and hands each, with a fresh connection to the target, to pipe.
type relay struct {
	ln              net.Listener
	network, target string
	pipe            func(client, server net.Conn)

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func startRelay(ln net.Listener, network, target string, pipe func(client, server net.Conn)) *relay {
	r := &relay{ln: ln, network: network, target: target, pipe: pipe, conns: map[net.Conn]struct{}{}}
	r.wg.Add(1)
	go r.serve()
	return r
}

// close stops listening and ends every forwarded connection.
func (r *relay) close() error {
	r.mu.Lock()
	r.closed = true
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	err := r.ln.Close()
	r.wg.Wait()
	return err
}

func (r *relay) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go r.forward(c)
	}
}

func (r *relay) forward(client net.Conn) {
	defer r.wg.Done()
	if !r.track(client) {
		return
	}
	defer r.untrack(client)
	server, err := net.Dial(r.network, r.target)
	if err != nil {
		return
	}
	if !r.track(server) {
		return
	}
	defer r.untrack(server)
	r.pipe(client, server)
}

// track registers c for close; false when the relay is closing.
func (r *relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		c.Close()
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *relay) untrack(c net.Conn) {
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
	c.Close()
}

// copyStream forwards src to dst, showing each chunk to count first, and half-closes dst
// when src ends.
func copyStream(dst, src net.Conn, count func([]byte)) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			count(buf[:n])
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	if hc, ok := dst.(interface{ CloseWrite() error }); ok {
		hc.CloseWrite()
	} else {
		dst.Close()
	}
}
