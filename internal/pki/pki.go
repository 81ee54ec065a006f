// Package pki makes certificate authorities and certificates for the emulator and tests: a root
// or intermediate CA with a software key, server certificates for the emulated endpoints, and
// device certificates for a given public key (so a TPM-held key can be certified) or a CSR.
// It does not decide who may have a certificate: registration-ID and CN rules are the caller's.
// It does not ship in the agent; PEM files and thumbprints are internal/certcodec's.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// KeyType selects the algorithm of a key this package generates.
type KeyType int

const (
	// ECDSAP256 is the default: small, fast, and what TPMs and DPS samples use.
	ECDSAP256 KeyType = iota
	// RSA2048 is for devices and tests that need an RSA chain.
	RSA2048
)

func (k KeyType) String() string {
	switch k {
	case ECDSAP256:
		return "ecdsa-p256"
	case RSA2048:
		return "rsa-2048"
	}
	return fmt.Sprintf("KeyType(%d)", int(k))
}

// Default lifetimes, counted from NotBefore.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	LeafValidity = 365 * 24 * time.Hour
	// backdate absorbs clock skew between the issuer and a device that has just booted.
	backdate = 5 * time.Minute
)

// ErrBadCSR reports a CSR whose signature does not verify.
var ErrBadCSR = errors.New("invalid certificate request")

// Option adjusts how a key or certificate is made.
type Option func(*options)

type options struct {
	keyType   KeyType
	notBefore time.Time
	notAfter  time.Time
	now       func() time.Time
}

// WithKeyType selects the algorithm of a generated key (default ECDSAP256).
func WithKeyType(k KeyType) Option { return func(o *options) { o.keyType = k } }

// WithValidity fixes the validity window, so tests can make expired or not-yet-valid
// certificates, or reproducible ones.
func WithValidity(notBefore, notAfter time.Time) Option {
	return func(o *options) { o.notBefore, o.notAfter = notBefore, notAfter }
}

// WithClock sets the clock the default validity window is computed from.
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

func collect(opts []Option) options {
	o := options{now: time.Now}
	for _, f := range opts {
		f(&o)
	}
	return o
}

// window returns the validity window: the injected one, or [now-backdate, +lifetime] clamped to
// the issuer's own NotAfter so that no certificate outlives its CA.
func (o options) window(lifetime time.Duration, issuer *x509.Certificate) (time.Time, time.Time) {
	if !o.notBefore.IsZero() || !o.notAfter.IsZero() {
		return o.notBefore, o.notAfter
	}
	nb := o.now().Add(-backdate).UTC().Truncate(time.Second)
	na := nb.Add(lifetime)
	if issuer != nil && na.After(issuer.NotAfter) {
		na = issuer.NotAfter
	}
	return nb, na
}

// NewKey generates a software private key.
func NewKey(k KeyType) (crypto.Signer, error) {
	switch k {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("cannot generate key: unknown key type %v", k)
}

// CA is a certificate authority whose key is held in memory.
type CA struct {
	// Certificate is the CA's own certificate.
	Certificate *x509.Certificate
	// Key signs what the CA issues.
	Key crypto.Signer
	// Issuers are the CA certificates above Certificate, nearest first, ending with the root;
	// empty for a root.
	Issuers []*x509.Certificate
}

// NewRoot creates a self-signed root CA with a fresh key.
func NewRoot(cn string, opts ...Option) (*CA, error) {
	o := collect(opts)
	key, err := NewKey(o.keyType)
	if err != nil {
		return nil, err
	}
	tmpl, err := caTemplate(cn, o, nil)
	if err != nil {
		return nil, err
	}
	cert, err := sign(tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("cannot create root CA %q: %w", cn, err)
	}
	return &CA{Certificate: cert, Key: key}, nil
}

// NewIntermediate creates a CA with a fresh key, signed by ca.
func (ca *CA) NewIntermediate(cn string, opts ...Option) (*CA, error) {
	o := collect(opts)
	key, err := NewKey(o.keyType)
	if err != nil {
		return nil, err
	}
	tmpl, err := caTemplate(cn, o, ca.Certificate)
	if err != nil {
		return nil, err
	}
	cert, err := sign(tmpl, ca.Certificate, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("cannot create intermediate CA %q: %w", cn, err)
	}
	return &CA{Certificate: cert, Key: key, Issuers: ca.Chain()}, nil
}

func caTemplate(cn string, o options, issuer *x509.Certificate) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	nb, na := o.window(CAValidity, issuer)
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil
}

// Chain is the CA's certificate followed by its issuers up to and including the root.
func (ca *CA) Chain() []*x509.Certificate {
	return append([]*x509.Certificate{ca.Certificate}, ca.Issuers...)
}

// Root is the top of the CA's chain: the self-signed root, unless the CA was loaded from a
// file that stops short of it.
func (ca *CA) Root() *x509.Certificate {
	if len(ca.Issuers) == 0 {
		return ca.Certificate
	}
	return ca.Issuers[len(ca.Issuers)-1]
}

// Pool is a pool holding only the CA's root, for verifying what the CA issued.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Root())
	return p
}

// Leaf is an end-entity certificate with the chain a peer needs to verify it.
type Leaf struct {
	// Chain is the leaf first, then the issuing CAs up to but not including the root: what a
	// TLS peer sends.
	Chain []*x509.Certificate
	// Key is the private key when this package generated it; nil for certificates issued for
	// a caller's public key or CSR.
	Key crypto.Signer
}

// Certificate is the leaf itself.
func (l *Leaf) Certificate() *x509.Certificate { return l.Chain[0] }

// TLSCertificate pairs the chain with the key for a tls.Config. It needs Key.
func (l *Leaf) TLSCertificate() tls.Certificate {
	tc := tls.Certificate{PrivateKey: l.Key, Leaf: l.Chain[0]}
	for _, c := range l.Chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc
}

// IssueServer issues a TLS server certificate with a fresh key for the given host names and IP
// addresses; the first name is also the subject CN.
func (ca *CA) IssueServer(names []string, opts ...Option) (*Leaf, error) {
	if len(names) == 0 {
		return nil, errors.New("cannot issue server certificate: no names")
	}
	o := collect(opts)
	key, err := NewKey(o.keyType)
	if err != nil {
		return nil, err
	}
	tmpl, err := ca.leafTemplate(pkix.Name{CommonName: names[0]}, key.Public(), x509.ExtKeyUsageServerAuth, o)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	return ca.issue(tmpl, key.Public(), key)
}

// NewDevice issues a device (TLS client) certificate for cn with a fresh software key.
func (ca *CA) NewDevice(cn string, opts ...Option) (*Leaf, error) {
	o := collect(opts)
	key, err := NewKey(o.keyType)
	if err != nil {
		return nil, err
	}
	l, err := ca.IssueDevice(cn, key.Public(), opts...)
	if err != nil {
		return nil, err
	}
	l.Key = key
	return l, nil
}

// IssueDevice issues a device (TLS client) certificate for cn and a public key whose private
// half the caller holds, e.g. in a TPM.
func (ca *CA) IssueDevice(cn string, pub crypto.PublicKey, opts ...Option) (*Leaf, error) {
	tmpl, err := ca.leafTemplate(pkix.Name{CommonName: cn}, pub, x509.ExtKeyUsageClientAuth, collect(opts))
	if err != nil {
		return nil, err
	}
	return ca.issue(tmpl, pub, nil)
}

// SignCSR issues a device certificate for a CSR after checking its signature (proof that the
// requester holds the key). The subject is copied from the CSR; requested extensions are not.
func (ca *CA) SignCSR(csr *x509.CertificateRequest, opts ...Option) (*Leaf, error) {
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	subject := csr.Subject
	subject.ExtraNames = nil
	tmpl, err := ca.leafTemplate(subject, csr.PublicKey, x509.ExtKeyUsageClientAuth, collect(opts))
	if err != nil {
		return nil, err
	}
	return ca.issue(tmpl, csr.PublicKey, nil)
}

func (ca *CA) leafTemplate(subject pkix.Name, pub crypto.PublicKey, eku x509.ExtKeyUsage, o options) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	usage := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		// TLS 1.2 RSA key exchange encrypts to the key; harmless for ECDHE and expected by
		// older verifiers.
		usage |= x509.KeyUsageKeyEncipherment
	}
	nb, na := o.window(LeafValidity, ca.Certificate)
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{eku},
		BasicConstraintsValid: true,
	}, nil
}

func (ca *CA) issue(tmpl *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*Leaf, error) {
	cert, err := sign(tmpl, ca.Certificate, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("cannot issue certificate for %q: %w", tmpl.Subject.CommonName, err)
	}
	chain := []*x509.Certificate{cert}
	for _, c := range ca.Chain() {
		if isSelfSigned(c) {
			break
		}
		chain = append(chain, c)
	}
	return &Leaf{Chain: chain, Key: key}, nil
}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func newSerial() (*big.Int, error) {
	// 128 random bits, positive: more than RFC 5280's 20-octet limit needs to stay unique.
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("cannot make serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
