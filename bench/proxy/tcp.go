// Package proxy holds the counting proxies the benchmark puts between the agent and what it
// talks to: a TCP proxy that counts connections, bytes and TLS records each way, and a TPM
// proxy that counts TPM commands by command code. They forward every byte unchanged.
package proxy

import (
	"encoding/binary"
	"net"
	"sync"
)

// TLS record content types (RFC 8446 §5.1).
const (
	RecordChangeCipherSpec = 20
	RecordAlert            = 21
	RecordHandshake        = 22
	RecordApplicationData  = 23
)

// Direction is one way through a proxy.
type Direction struct {
	Bytes int64
	// Records counts TLS records by content type. The payload is encrypted, so MQTT packets
	// cannot be parsed here; Go's crypto/tls and paho send one MQTT packet per record while
	// the packet fits the record size (1 KB and up, growing), so application-data records are
	// an upper bound on MQTT packets that equals them for small packets.
	Records map[byte]int
}

// AppRecords is the number of TLS application-data records.
func (d Direction) AppRecords() int { return d.Records[RecordApplicationData] }

// TCPCounts is what went through a TCP proxy.
type TCPCounts struct {
	Connections int
	// Up is client to server, Down server to client.
	Up, Down Direction
}

// Sub is the difference c - o, for counts over an interval.
func (c TCPCounts) Sub(o TCPCounts) TCPCounts {
	sub := func(a, b Direction) Direction {
		d := Direction{Bytes: a.Bytes - b.Bytes, Records: map[byte]int{}}
		for k, v := range a.Records {
			if n := v - b.Records[k]; n != 0 {
				d.Records[k] = n
			}
		}
		return d
	}
	return TCPCounts{Connections: c.Connections - o.Connections, Up: sub(c.Up, o.Up), Down: sub(c.Down, o.Down)}
}

// TCP forwards connections from its listener to a target address and counts them.
type TCP struct {
	*relay
	mu     sync.Mutex
	counts TCPCounts
}

// ListenTCP listens on addr ("127.0.0.1:0" picks a port) and forwards to target.
func ListenTCP(addr, target string) (*TCP, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	p := &TCP{counts: TCPCounts{Up: Direction{Records: map[byte]int{}}, Down: Direction{Records: map[byte]int{}}}}
	p.relay = startRelay(ln, "tcp", target, p.pipe)
	return p, nil
}

// Addr is the address clients dial.
func (p *TCP) Addr() string { return p.ln.Addr().String() }

// Counts returns a copy of the counters.
func (p *TCP) Counts() TCPCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts.Sub(TCPCounts{})
}

// Close stops listening and ends every forwarded connection.
func (p *TCP) Close() error { return p.close() }

func (p *TCP) pipe(client, server net.Conn) {
	p.mu.Lock()
	p.counts.Connections++
	p.mu.Unlock()
	counter := func(d *Direction) func([]byte) {
		var rec recordCounter
		return func(b []byte) {
			p.mu.Lock()
			defer p.mu.Unlock()
			d.Bytes += int64(len(b))
			rec.feed(b, d.Records)
		}
	}
	var done sync.WaitGroup
	done.Go(func() { copyStream(server, client, counter(&p.counts.Up)) })
	copyStream(client, server, counter(&p.counts.Down))
	done.Wait()
}

// recordCounter follows the TLS record layer of a byte stream fed in arbitrary chunks.
type recordCounter struct {
	header [5]byte
	have   int // header bytes read
	skip   int // body bytes of the current record still to come
}

func (r *recordCounter) feed(b []byte, counts map[byte]int) {
	for len(b) > 0 {
		if r.skip > 0 {
			n := min(r.skip, len(b))
			r.skip, b = r.skip-n, b[n:]
			continue
		}
		n := copy(r.header[r.have:], b)
		r.have, b = r.have+n, b[n:]
		if r.have == len(r.header) {
			counts[r.header[0]]++
			r.skip = int(binary.BigEndian.Uint16(r.header[3:5]))
			r.have = 0
		}
	}
}
