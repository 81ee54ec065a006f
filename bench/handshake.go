package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"time"

	"github.com/unicity-iot/unicity/bench/proxy"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

// handshakeRecords are the TLS application-data records of a handshake alone, each way.
type handshakeRecords struct{ up, down int }

// handshakeCost makes one TLS handshake through p as the agent makes it (crypto/tls, a
// device certificate offered unasked) and sends nothing: TLS 1.3 encrypts the handshake
// after ServerHello, so its records look like application data. A boot's records less these,
// once per connection, are its MQTT packets.
func (h *harness) handshakeCost(ctx context.Context, p *proxy.TCP, bundle string) (handshakeRecords, error) {
	roots, err := certcodec.ReadCertificates(bundle)
	if err != nil {
		return handshakeRecords{}, err
	}
	leaf, err := h.factory.NewDevice("bench-handshake")
	if err != nil {
		return handshakeRecords{}, err
	}
	cert := leaf.TLSCertificate()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	host, _, _ := net.SplitHostPort(p.Addr())
	before := p.Counts()
	d := tls.Dialer{Config: &tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: host,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}}
	c, err := d.DialContext(ctx, "tcp", p.Addr())
	if err != nil {
		return handshakeRecords{}, err
	}
	defer c.Close()
	// The server's session ticket follows the client's Finished; the count is read before
	// the close alert.
	select {
	case <-time.After(settle):
	case <-ctx.Done():
		return handshakeRecords{}, ctx.Err()
	}
	n := p.Counts().Sub(before)
	return handshakeRecords{up: n.Up.AppRecords(), down: n.Down.AppRecords()}, nil
}
