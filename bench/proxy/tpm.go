package proxy

import (
	"encoding/binary"
	"net"
	"sync"
)

// CCSign is TPM2_Sign's command code (TPM 2.0 Part 2, TPM_CC).
const CCSign uint32 = 0x0000015D

// TPMCounts is what went through a TPM proxy.
type TPMCounts struct {
	Commands int
	ByCode   map[uint32]int
}

// Sub is the difference c - o.
func (c TPMCounts) Sub(o TPMCounts) TPMCounts {
	d := TPMCounts{Commands: c.Commands - o.Commands, ByCode: map[uint32]int{}}
	for k, v := range c.ByCode {
		if n := v - o.ByCode[k]; n != 0 {
			d.ByCode[k] = n
		}
	}
	return d
}

// TPM forwards a unix-socket TPM (swtpm's server socket) and counts the commands sent to it,
// reading each command's 10-byte header: tag (2), size (4), command code (4).
type TPM struct {
	*relay
	mu     sync.Mutex
	counts TPMCounts
}

// ListenTPM listens on the unix socket path and forwards to the unix socket target.
func ListenTPM(path, target string) (*TPM, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	p := &TPM{counts: TPMCounts{ByCode: map[uint32]int{}}}
	p.relay = startRelay(ln, "unix", target, p.pipe)
	return p, nil
}

// Path is the socket clients open, for a "swtpm:PATH" spec.
func (p *TPM) Path() string { return p.ln.Addr().String() }

// Counts returns a copy of the counters.
func (p *TPM) Counts() TPMCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts.Sub(TPMCounts{})
}

// Close stops listening and ends every forwarded connection.
func (p *TPM) Close() error { return p.close() }

func (p *TPM) pipe(client, server net.Conn) {
	var cmd commandCounter
	var done sync.WaitGroup
	// Responses are forwarded as they come; only commands are counted.
	done.Go(func() { copyStream(client, server, func([]byte) {}) })
	copyStream(server, client, func(b []byte) {
		p.mu.Lock()
		defer p.mu.Unlock()
		cmd.feed(b, &p.counts)
	})
	done.Wait()
}

// commandCounter follows the TPM command framing of a byte stream fed in arbitrary chunks.
type commandCounter struct {
	header [10]byte
	have   int
	skip   int
}

func (c *commandCounter) feed(b []byte, counts *TPMCounts) {
	for len(b) > 0 {
		if c.skip > 0 {
			n := min(c.skip, len(b))
			c.skip, b = c.skip-n, b[n:]
			continue
		}
		n := copy(c.header[c.have:], b)
		c.have, b = c.have+n, b[n:]
		if c.have == len(c.header) {
			code := binary.BigEndian.Uint32(c.header[6:10])
			counts.Commands++
			counts.ByCode[code]++
			c.skip = max(int(binary.BigEndian.Uint32(c.header[2:6]))-len(c.header), 0)
			c.have = 0
		}
	}
}
