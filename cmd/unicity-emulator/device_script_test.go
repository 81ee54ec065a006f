package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/dial"
)

// setupPorts gives each scenario free loopback ports for serve (DPS_PORT, HUB_PORT), so that
// the device command knows where DPS is without reading serve's output.
func setupPorts(env *testscript.Env) error {
	for _, name := range []string{"DPS_PORT", "HUB_PORT"} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		l.Close()
		env.Setenv(name, port)
	}
	return nil
}

// cmdDevice is a device for the scenarios, made of the agent's own dps and hub packages:
//
//	device provision EMUDIR ID [P-384]
//	    register ID with DPS at 127.0.0.1:$DPS_PORT, onboarding with ID.key and ID.pem (from
//	    openssl and 'sign'), with a CSR for a new operational key; print the hub and the
//	    issued certificate's thumbprint; keep the key and chain as ID-op.key and ID-op.pem.
//	device connect EMUDIR ID
//	    connect to the hub with the operational certificate.
//	device renew EMUDIR ID
//	    connect and renew through the hub for a new key, which replaces ID-op.*.
func cmdDevice(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 3 {
		ts.Fatalf("usage: device provision|connect|renew EMUDIR ID [P-384]")
	}
	d, err := loadDir(ts.MkAbs(args[1]))
	ts.Check(err)
	dev := &scriptDevice{ts: ts, dir: d, id: args[2]}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out string
	switch args[0] {
	case "provision":
		out, err = dev.provision(ctx, len(args) > 3 && args[3] == "P-384")
	case "connect":
		out, err = dev.session(ctx, false)
	case "renew":
		out, err = dev.session(ctx, true)
	default:
		ts.Fatalf("device: unknown subcommand %q", args[0])
	}
	switch {
	case err != nil && !neg:
		ts.Fatalf("device %s: %v", args[0], err)
	case err == nil && neg:
		ts.Fatalf("device %s succeeded unexpectedly: %s", args[0], out)
	case err != nil:
		fmt.Fprintln(ts.Stderr(), err)
	default:
		fmt.Fprintln(ts.Stdout(), out)
	}
}

type scriptDevice struct {
	ts  *testscript.TestScript
	dir *emulatorDir
	id  string
}

func (d *scriptDevice) file(suffix string) string { return d.ts.MkAbs(d.id + suffix) }

func (d *scriptDevice) roots() (*x509.CertPool, error) {
	certs, err := certcodec.ReadCertificates(d.dir.file(trustBundleFile))
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p, nil
}

// identity loads the credential kept as ID+suffix .key and .pem, and what verifies the hubs.
func (d *scriptDevice) identity(suffix string) (*attest.Identity, *x509.CertPool, error) {
	key, err := certcodec.ReadPrivateKey(d.file(suffix + ".key"))
	if err != nil {
		return nil, nil, err
	}
	chain, err := certcodec.ReadCertificates(d.file(suffix + ".pem"))
	if err != nil {
		return nil, nil, err
	}
	id, err := attest.NewIdentity(chain, key, time.Now())
	if err != nil {
		return nil, nil, err
	}
	roots, err := d.roots()
	return id, roots, err
}

func (d *scriptDevice) provision(ctx context.Context, p384 bool) (string, error) {
	id, roots, err := d.identity("")
	if err != nil {
		return "", err
	}
	curve := elliptic.P256()
	if p384 {
		curve = elliptic.P384()
	}
	key, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		return "", err
	}
	cert := id.TLSCertificate()
	a, err := dps.Register(ctx, dps.Request{Endpoint: "127.0.0.1:" + d.ts.Getenv("DPS_PORT"), IDScope: d.dir.cfg.IDScope,
		Transport: dial.TransportMQTT, RootCAs: roots, Certificate: &cert, CSRSigner: key})
	if err != nil {
		return "", err
	}
	leaf, err := d.keep(a.IssuedChain, key)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(d.file("-hub.txt"), []byte(a.AssignedHub), 0o600); err != nil {
		return "", err
	}
	return fmt.Sprintf("assigned %s issued %s", a.AssignedHub, certcodec.Thumbprint(leaf)), nil
}

// keep stores an issued chain and its key as the device's operational credential.
func (d *scriptDevice) keep(ders [][]byte, key crypto.Signer) (*x509.Certificate, error) {
	id, err := attest.IssuedIdentity(ders, key, time.Now())
	if err != nil {
		return nil, err
	}
	if err := certcodec.WritePrivateKey(d.file("-op.key"), key); err != nil {
		return nil, err
	}
	return id.Chain[0], certcodec.WriteCertificates(d.file("-op.pem"), id.Chain...)
}

// session connects with the operational credential and, with renew, renews it.
func (d *scriptDevice) session(ctx context.Context, renew bool) (string, error) {
	id, roots, err := d.identity("-op")
	if err != nil {
		return "", err
	}
	hubName, err := os.ReadFile(d.file("-hub.txt"))
	if err != nil {
		return "", err
	}
	cert := id.TLSCertificate()
	c, err := hub.New(hub.Config{Hub: string(hubName), DeviceID: d.id, MaxFailures: 1, CertificateRenewal: renew,
		Dial: dial.Config{Transport: dial.TransportMQTT, RootCAs: roots, Certificate: &cert}})
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithCancel(ctx)
	ran, connected := make(chan error, 1), make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	go func() { connected <- c.AwaitConnection(ctx) }()
	select {
	case err := <-ran:
		cancel()
		return "", err
	case err := <-connected:
		defer func() {
			cancel()
			<-ran
		}()
		if err != nil {
			return "", err
		}
	}
	if !renew {
		return "connected " + certcodec.Thumbprint(id.Chain[0]), nil
	}
	next, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	csr, err := attest.CreateCSR(next, d.id)
	if err != nil {
		return "", err
	}
	ders, err := c.IssueCertificate(ctx, csr, false)
	if err != nil {
		return "", err
	}
	leaf, err := d.keep(ders, next)
	if err != nil {
		return "", err
	}
	return "renewed " + certcodec.Thumbprint(leaf) + " valid " + strconv.Itoa(int(leaf.NotAfter.Sub(leaf.NotBefore)/time.Second)) + "s", nil
}
