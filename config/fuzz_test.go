package config

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParseConfig: no configuration file, however broken, crashes the parser; every refusal
// is a Error that names the file, and every accepted configuration passes its own
// validation.
func FuzzParseConfig(f *testing.F) {
	example, err := os.ReadFile("testdata/config.example.toml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte("[provisioning]\nid_scope = \"0ne00000000\"\n[attestation]\nidentity_cert = \"c.pem\"\nidentity_key = \"file:k.pem\"\n"))
	f.Add([]byte("[provisioning]\nid_scope = 5\n"))
	f.Add([]byte("[agent]\nretry_min = \"-1s\"\nretry_max = \"1ms\"\n"))
	f.Add([]byte("[provisioning]\npayload = '{\"a\":'\n"))
	f.Add([]byte("[provisioning.x]\n[[tls]]\n"))
	f.Add([]byte("unknown = 1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.toml", data)
		if err != nil {
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("not a Error: %T %v", err, err)
			}
			if !strings.HasPrefix(err.Error(), "fuzz.toml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if err := cfg.validate(); err != nil {
			t.Fatalf("accepted a configuration that fails validation: %v", err)
		}
	})
}
