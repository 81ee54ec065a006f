package device

import (
	"crypto/x509"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/storage"
)

// RenewalInfo is the renewal of the stored operational certificate as `status`, `identity`
// and `check` show it: from the running agent's schedule when it runs, else from the stored
// certificate and the configuration, which give the same time (RenewalTime).
type RenewalInfo struct {
	// NextAt is when the certificate is due for renewal.
	NextAt time.Time `json:"next_at"`
	// State, Via and Failures are the running agent's (RenewalStatus); State is empty when
	// it does not run.
	State    string `json:"state,omitempty"`
	Via      string `json:"via,omitempty"`
	Failures int    `json:"failures,omitempty"`
	// Last is how the latest renewal ended, nil before the first.
	Last *storage.RenewalResult `json:"last,omitempty"`
	// Pending is a renewed certificate waiting for the hub to accept a connection with it
	// (storage.State.Renewal); the stored one stays in force until then.
	Pending *PendingRenewal `json:"pending,omitempty"`
}

// PendingRenewal is a renewed operational certificate on trial.
type PendingRenewal struct {
	SHA256Thumbprint string    `json:"sha256_thumbprint"`
	NotAfter         time.Time `json:"not_after"`
	Via              string    `json:"via"`
	IssuedAt         time.Time `json:"issued_at"`
	Key              string    `json:"key"`
}

// DescribeRenewal is the renewal of st's operational certificate under cc; live is the
// running agent's Status.Renewal, nil when it does not run (or has none). nil when st holds
// no operational certificate.
func DescribeRenewal(cc config.Certificates, st *storage.State, live *RenewalStatus) (*RenewalInfo, error) {
	if len(st.IssuedChain) == 0 {
		return nil, nil
	}
	c, err := x509.ParseCertificate(st.IssuedChain[0])
	if err != nil {
		return nil, fmt.Errorf("the stored operational certificate: %w", err)
	}
	info := &RenewalInfo{NextAt: RenewalTime(cc, c), Last: st.LastRenewal}
	if live != nil {
		info.State, info.Via, info.Failures = live.State, live.Via, live.Failures
		if !live.NextAt.IsZero() {
			info.NextAt = live.NextAt
		}
		if live.Last != nil {
			info.Last = live.Last
		}
	}
	if r := st.Renewal; r != nil && len(r.IssuedChain) > 0 {
		c, err := x509.ParseCertificate(r.IssuedChain[0])
		if err != nil {
			return nil, fmt.Errorf("the renewed operational certificate: %w", err)
		}
		info.Pending = &PendingRenewal{SHA256Thumbprint: certcodec.Thumbprint(c), NotAfter: c.NotAfter, Via: r.Via, IssuedAt: r.IssuedAt, Key: r.OperationalKey}
	}
	return info, nil
}
