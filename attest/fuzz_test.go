package attest_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// seedPEM is a device chain and its software key, as the factory writes them.
func seedPEM(f *testing.F) (chain, key []byte) {
	ca, err := pki.NewRoot("fuzz root")
	if err != nil {
		f.Fatal(err)
	}
	leaf, err := ca.NewDevice("gw-fuzz")
	if err != nil {
		f.Fatal(err)
	}
	dir := f.TempDir()
	if err := certcodec.WriteCertificates(filepath.Join(dir, "c.pem"), leaf.Chain...); err != nil {
		f.Fatal(err)
	}
	if err := certcodec.WritePrivateKey(filepath.Join(dir, "k.pem"), leaf.Key); err != nil {
		f.Fatal(err)
	}
	chain, _ = os.ReadFile(filepath.Join(dir, "c.pem"))
	key, _ = os.ReadFile(filepath.Join(dir, "k.pem"))
	return chain, key
}

// FuzzLoadChain reads any identity file: nothing panics, a refusal is ErrInvalidIdentity,
// and what is accepted is at least one certificate, leaf first.
func FuzzLoadChain(f *testing.F) {
	chain, key := seedPEM(f)
	f.Add(chain)
	f.Add(chain[:len(chain)/2])
	f.Add(key)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("junk before\n" + string(chain) + "junk after"))
	path := filepath.Join(f.TempDir(), "identity.pem")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		certs, err := attest.LoadChain(nil, path)
		if err != nil {
			if !errors.Is(err, attest.ErrInvalidIdentity) {
				t.Fatalf("not ErrInvalidIdentity: %v", err)
			}
			return
		}
		if len(certs) == 0 || certs[0] == nil {
			t.Fatal("accepted an empty chain")
		}
		// Whatever the dates, a loaded chain is judged, not crashed on.
		attest.CheckValidity(certs[0], time.Now())
	})
}

// FuzzLoadKey reads any key file, as a software key (file:) and as a TSS2 keyfile loaded
// into the TPM simulator (tpmkey:): nothing panics, a refusal is ErrInvalidKey or a TPM
// error, never a crash of the TPM session, and the key bytes never appear in the error.
func FuzzLoadKey(f *testing.F) {
	_, key := seedPEM(f)
	f.Add(key)
	f.Add(key[:len(key)-40])
	f.Add([]byte("-----BEGIN TSS2 PRIVATE KEY-----\nMAA=\n-----END TSS2 PRIVATE KEY-----\n"))
	f.Add([]byte("-----BEGIN RSA PRIVATE KEY-----\nMAA=\n-----END RSA PRIVATE KEY-----\n"))
	tpm := attesttest.Simulator(f)
	path := filepath.Join(f.TempDir(), "identity.key")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, spec := range []string{"file:" + path, "tpmkey:" + path} {
			k, err := attest.LoadKey(tpm, spec)
			if err == nil {
				k.Close()
				continue
			}
			if len(data) >= 16 && strings.Contains(err.Error(), string(data)) {
				t.Fatalf("%s: the error quotes the key file: %v", spec, err)
			}
		}
	})
}

// FuzzSpecs: the handle, NV index and registration ID strings of the configuration are
// refused or accepted, never crashed on, and accepted handles are in their ranges.
func FuzzSpecs(f *testing.F) {
	for _, s := range []string{"0x81000002", "0x01c0000a", "2164260866", "0x8100000000", "-1", "gw-0001", "GW.01:a_b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if h, err := attest.ParsePersistentHandle(s); err == nil && uint32(h)>>24 != 0x81 {
			t.Fatalf("persistent handle %#x accepted", uint32(h))
		}
		if h, err := attest.ParseNVIndex(s); err == nil && uint32(h)>>24 != 0x01 {
			t.Fatalf("NV index %#x accepted", uint32(h))
		}
		attest.ValidRegistrationID(s)
	})
}
