// Package faultnet is a loopback TCP proxy for fault tests: it forwards connections to a
// target and, on request, drops, stalls or resets one of them at a chosen byte count or TLS
// record in a chosen direction. It knows nothing of the protocols it carries.
package faultnet

import (
	"errors"
	"io"
	"net"
	"sync"
)

// Direction is the way bytes flow through the proxy.
type Direction int

const (
	// Up is client to server.
	Up Direction = iota + 1
	// Down is server to client.
	Down
)

func (d Direction) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return "any"
}

// Action is what a fault does to the connection it fires on.
type Action int

const (
	// Drop closes both sides (FIN, which the kernel turns into a RST when bytes the peer
	// sent are still unread), as a proxy or NAT that gives up would.
	Drop Action = iota + 1
	// Stall forwards nothing more in either direction and closes nothing: the peers see
	// silence, as behind a dead link or a blackholing firewall. Bytes sent into a stalled
	// connection are read and thrown away so that writers do not block.
	Stall
	// Reset aborts both sides with a TCP RST.
	Reset
)

func (a Action) String() string {
	switch a {
	case Drop:
		return "drop"
	case Stall:
		return "stall"
	case Reset:
		return "reset"
	}
	return "none"
}

// Fault says where and how a connection fails. It fires on the Conn-th connection the proxy
// accepts from the moment it is armed (1 is the next one; 0 means 1), in Direction, once
// AfterBytes bytes have gone through that way, or once AfterRecords complete TLS records
// have (the record layer's 5-byte headers are read to find their ends). With neither set it
// fires when the connection is accepted, before any byte moves.
type Fault struct {
	Conn         int
	Direction    Direction
	AfterBytes   int64
	AfterRecords int
	Action       Action
}

// Proxy accepts on 127.0.0.1 and forwards every connection to its target.
type Proxy struct {
	ln net.Listener

	mu       sync.Mutex
	target   string
	accepted int
	armed    []armed
	fired    []Fault
	conns    map[*link]struct{}
	closed   bool

	wg sync.WaitGroup
}

type armed struct {
	Fault
	conn int // absolute connection number
}

// Listen starts a proxy to target on a free loopback port.
func Listen(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, conns: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is where clients connect, 127.0.0.1:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Port is Addr's port, for names such as "localhost:<port>" that a certificate covers.
func (p *Proxy) Port() string {
	_, port, _ := net.SplitHostPort(p.Addr())
	return port
}

// SetTarget sends new connections to addr (an emulator restarted on another port).
func (p *Proxy) SetTarget(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = addr
}

// Inject arms f.
func (p *Proxy) Inject(f Fault) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := f.Conn
	if n < 1 {
		n = 1
	}
	p.armed = append(p.armed, armed{Fault: f, conn: p.accepted + n})
}

// Fired lists the faults that have fired, in order.
func (p *Proxy) Fired() []Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Fault(nil), p.fired...)
}

// Pending is the number of armed faults that have not fired.
func (p *Proxy) Pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.armed)
}

// Accepted is the number of connections accepted so far.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// CloseConns ends every open connection (a reset), as a restarting middlebox would.
func (p *Proxy) CloseConns() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.conns))
	for l := range p.conns {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.abort(Reset)
	}
}

// Close stops accepting, ends every connection and waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.CloseConns()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.accepted++
		n, target := p.accepted, p.target
		var faults []Fault
		kept := p.armed[:0]
		for _, a := range p.armed {
			if a.conn == n {
				faults = append(faults, a.Fault)
			} else if a.conn > n {
				kept = append(kept, a)
			}
		}
		p.armed = kept
		l := &link{p: p, client: c, faults: faults, done: make(chan struct{})}
		p.conns[l] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			l.run(target)
		}()
	}
}

func (p *Proxy) fire(f Fault) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fired = append(p.fired, f)
}

func (p *Proxy) forget(l *link) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, l)
}

// link is one proxied connection.
type link struct {
	p      *Proxy
	client net.Conn
	faults []Fault

	mu      sync.Mutex
	server  net.Conn
	stalled bool
	ended   bool
	done    chan struct{} // closed when the connection is over, stalled or not
}

func (l *link) run(target string) {
	defer l.p.forget(l)
	for _, f := range l.faults {
		if f.AfterBytes == 0 && f.AfterRecords == 0 {
			l.p.fire(f)
			l.abort(f.Action)
			if f.Action == Stall {
				// Swallow what the client sends until it gives up.
				io.Copy(io.Discard, l.client)
				l.abort(Drop)
			}
			return
		}
	}
	server, err := net.Dial("tcp", target)
	if err != nil {
		l.client.Close()
		return
	}
	l.mu.Lock()
	l.server = server
	ended := l.ended
	l.mu.Unlock()
	if ended {
		server.Close()
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.pipe(Up, l.client, server) }()
	go func() { defer wg.Done(); l.pipe(Down, server, l.client) }()
	wg.Wait()
	l.wait()
	l.abort(Drop)
}

// wait holds a stalled connection open until a peer gives up or the proxy closes.
func (l *link) wait() {
	l.mu.Lock()
	stalled := l.stalled
	l.mu.Unlock()
	if stalled {
		<-l.done
	}
}

// pipe copies one direction until EOF, an error or a fault. EOF is passed on as a
// half-close, so a clean shutdown stays clean.
func (l *link) pipe(dir Direction, from, to net.Conn) {
	var triggers []*trigger
	for _, f := range l.faults {
		if f.AfterBytes > 0 || f.AfterRecords > 0 {
			if f.Direction == dir || f.Direction == 0 {
				triggers = append(triggers, newTrigger(f))
			}
		}
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		chunk := buf[:n]
		for len(chunk) > 0 {
			if l.isStalled() {
				chunk = nil // thrown away
				break
			}
			pass, fired := len(chunk), (*trigger)(nil)
			for _, t := range triggers {
				if k := t.scan(chunk); k >= 0 && (fired == nil || k < pass) {
					pass, fired = k, t
				}
			}
			if pass > 0 {
				if _, werr := to.Write(chunk[:pass]); werr != nil {
					l.abort(Drop)
					return
				}
				for _, t := range triggers {
					if t != fired {
						t.advance(chunk[:pass])
					}
				}
			}
			chunk = chunk[pass:]
			if fired != nil {
				l.p.fire(fired.f)
				l.abort(fired.f.Action)
				if fired.f.Action != Stall {
					return
				}
				triggers = nil
			}
		}
		if err != nil {
			if l.isStalled() {
				// A peer gave up on the silent connection: that ends it.
				l.abort(Drop)
				return
			}
			if errors.Is(err, io.EOF) {
				if tc, ok := to.(*net.TCPConn); ok {
					tc.CloseWrite()
					return
				}
			}
			l.abort(Drop)
			return
		}
	}
}

func (l *link) isStalled() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stalled
}

// abort applies a terminal action to both sides. Stall keeps both open; anything else, or a
// second abort of a stalled link, closes them.
func (l *link) abort(a Action) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ended {
		return
	}
	if a == Stall && !l.stalled {
		l.stalled = true
		return
	}
	l.ended = true
	for _, c := range []net.Conn{l.client, l.server} {
		if c == nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok && a == Reset {
			tc.SetLinger(0)
		}
		c.Close()
	}
	close(l.done)
}

// trigger finds where in the stream a byte- or record-counted fault fires.
type trigger struct {
	f     Fault
	bytes int64
	rec   recordScanner
}

func newTrigger(f Fault) *trigger { return &trigger{f: f} }

// scan returns how many bytes of chunk pass before the fault fires, or -1 if it does not
// fire within chunk.
func (t *trigger) scan(chunk []byte) int {
	if t.f.AfterBytes > 0 {
		if k := t.f.AfterBytes - t.bytes; k >= 0 && k <= int64(len(chunk)) {
			return int(k)
		}
		return -1
	}
	r := t.rec
	for i, b := range chunk {
		if r.feed(b) && r.records == t.f.AfterRecords {
			return i + 1
		}
	}
	return -1
}

// advance records that chunk went through.
func (t *trigger) advance(chunk []byte) {
	t.bytes += int64(len(chunk))
	for _, b := range chunk {
		t.rec.feed(b)
	}
}

// recordScanner counts complete TLS records: a 5-byte header whose last two bytes are the
// length of the body that follows.
type recordScanner struct {
	header  [5]byte
	have    int // header bytes seen of the current record
	body    int // body bytes still to come
	records int
}

// feed takes one byte and reports whether it completed a record.
func (r *recordScanner) feed(b byte) bool {
	if r.have < len(r.header) {
		r.header[r.have] = b
		r.have++
		if r.have == len(r.header) {
			r.body = int(r.header[3])<<8 | int(r.header[4])
		} else {
			return false
		}
	} else {
		r.body--
	}
	if r.body == 0 {
		r.have = 0
		r.records++
		return true
	}
	return false
}
