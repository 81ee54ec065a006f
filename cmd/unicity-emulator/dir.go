package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// Files in the emulator directory. Keys are 0600, the directory 0700.
const (
	configFile      = "emulator.json"
	serverCAFile    = "server-ca.pem" // the root every other CA chains to
	serverCAKey     = "server-ca.key"
	factoryCAFile   = "factory-ca.pem" // signs device certificates; enrolled as group "factory"
	factoryCAKey    = "factory-ca.key"
	issuingCAFile   = "issuing-ca.pem" // signs CSRs sent with a registration
	issuingCAKey    = "issuing-ca.key"
	trustBundleFile = "trust-bundle.pem" // what devices trust: the root
	adminSocketFile = "admin.sock"
	configVersion   = 1
)

// config is emulator.json.
type config struct {
	Version int    `json:"version"`
	IDScope string `json:"id_scope"`
}

// emulatorDir is an initialised emulator directory, loaded.
type emulatorDir struct {
	path      string
	cfg       config
	serverCA  *pki.CA
	factoryCA *pki.CA
	issuingCA *pki.CA
}

func loadDir(path string) (*emulatorDir, error) {
	data, err := os.ReadFile(filepath.Join(path, configFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s is not an emulator directory (run 'unicity-emulator init --dir %s')", path, path)
	}
	if err != nil {
		return nil, err
	}
	d := &emulatorDir{path: path}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d.cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(path, configFile), err)
	}
	if d.cfg.Version != configVersion {
		return nil, fmt.Errorf("%s: unsupported version %d", filepath.Join(path, configFile), d.cfg.Version)
	}
	for _, ca := range []struct {
		dst       **pki.CA
		cert, key string
	}{{&d.serverCA, serverCAFile, serverCAKey}, {&d.factoryCA, factoryCAFile, factoryCAKey}, {&d.issuingCA, issuingCAFile, issuingCAKey}} {
		if *ca.dst, err = pki.LoadCA(d.file(ca.cert), d.file(ca.key)); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func (d *emulatorDir) file(name string) string { return filepath.Join(d.path, name) }

func runInit(_ context.Context, e *env, args []string) error {
	fs, dir := newFlags("init")
	scope := fs.String("id-scope", "", "DPS ID `scope` (default: a random 0ne… scope)")
	if err := parse(e, fs, "--dir DIR [--id-scope SCOPE]", args); err != nil {
		return err
	}
	if strings.IndexFunc(*scope, func(r rune) bool { return !isAlnum(r) }) >= 0 || len(*scope) > 64 {
		return usageErrorf("init: --id-scope %q: an ID scope is letters and digits, like 0ne00ABC123", *scope)
	}
	if *scope == "" {
		b := make([]byte, 4)
		rand.Read(b)
		*scope = "0ne" + strings.ToUpper(hex.EncodeToString(b))
	}
	if _, err := os.Stat(filepath.Join(*dir, configFile)); err == nil {
		return fmt.Errorf("%s is already initialised; remove it first to start over", *dir)
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	d := &emulatorDir{path: *dir, cfg: config{Version: configVersion, IDScope: *scope}}
	var err error
	if d.serverCA, err = pki.NewRoot("unicity emulator root"); err != nil {
		return err
	}
	if d.factoryCA, err = d.serverCA.NewIntermediate("unicity emulator factory CA"); err != nil {
		return err
	}
	if d.issuingCA, err = d.serverCA.NewIntermediate("unicity emulator issuing CA"); err != nil {
		return err
	}
	for _, ca := range []struct {
		ca        *pki.CA
		cert, key string
	}{{d.serverCA, serverCAFile, serverCAKey}, {d.factoryCA, factoryCAFile, factoryCAKey}, {d.issuingCA, issuingCAFile, issuingCAKey}} {
		if err := ca.ca.Save(d.file(ca.cert), d.file(ca.key)); err != nil {
			return err
		}
	}
	if err := certcodec.WriteCertificates(d.file(trustBundleFile), d.serverCA.Root()); err != nil {
		return err
	}
	cfg, err := json.MarshalIndent(d.cfg, "", "  ")
	if err != nil {
		return err
	}
	// Written last: its presence marks a complete directory.
	if err := os.WriteFile(d.file(configFile), append(cfg, '\n'), 0o600); err != nil {
		return err
	}
	return printJSON(e.stdout, map[string]string{
		"dir":          d.path,
		"id_scope":     d.cfg.IDScope,
		"trust_bundle": absPath(d.file(trustBundleFile)),
		"factory_ca":   absPath(d.file(factoryCAFile)),
	})
}

func runSign(_ context.Context, e *env, args []string) error {
	fs, dir := newFlags("sign")
	csrPath := fs.String("csr", "", "device certificate request `file` (PEM or DER)")
	out := fs.String("out", "", "`file` to write the certificate chain to (leaf, then the factory CA)")
	if err := parse(e, fs, "--dir DIR --csr FILE --out FILE", args); err != nil {
		return err
	}
	if *csrPath == "" || *out == "" {
		return usageErrorf("sign: --csr and --out are required")
	}
	d, err := loadDir(*dir)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(*csrPath)
	if err != nil {
		return err
	}
	if block, _ := pem.Decode(data); block != nil {
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return fmt.Errorf("%s: PEM block is %q, not a CERTIFICATE REQUEST", *csrPath, block.Type)
		}
		data = block.Bytes
	}
	csr, err := x509.ParseCertificateRequest(data)
	if err != nil {
		return fmt.Errorf("%s: %w", *csrPath, err)
	}
	// The CN becomes the registration ID and device ID; refuse one DPS would refuse.
	if err := attest.ValidRegistrationID(csr.Subject.CommonName); err != nil {
		return fmt.Errorf("%s: subject CN: %w", *csrPath, err)
	}
	leaf, err := d.factoryCA.SignCSR(csr)
	if err != nil {
		return fmt.Errorf("%s: %w", *csrPath, err)
	}
	if err := certcodec.WriteCertificates(*out, leaf.Chain...); err != nil {
		return err
	}
	return printJSON(e.stdout, map[string]string{
		"registration_id":   leaf.Certificate().Subject.CommonName,
		"sha256_thumbprint": certcodec.Thumbprint(leaf.Certificate()),
		"not_after":         leaf.Certificate().NotAfter.UTC().Format("2006-01-02T15:04:05Z"),
		"out":               *out,
	})
}

func printJSON(w io.Writer, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

func isAlnum(r rune) bool {
	return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
