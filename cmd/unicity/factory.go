package main

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

const defaultConfigPath = "/etc/unicity/config.toml"

// now is the clock certificates are checked against; a seam for tests.
var now = time.Now

func factoryCommands() []command {
	return []command{
		{Name: "keygen", Summary: "create a non-exportable device key inside the TPM", Run: runFactoryKeygen},
		{Name: "csr", Summary: "make a certificate signing request signed inside the TPM", Run: runFactoryCSR},
		{Name: "install", Summary: "check and install the device certificate; print the manifest line", Run: runFactoryInstall},
		{Name: "verify", Summary: "end-of-line check of the configured identity", Run: runFactoryVerify},
		{Name: "ek", Summary: "print the TPM's endorsement key and registration ID for a TPM enrollment", Run: runFactoryEK},
	}
}

// tpmFlags are the flags every command that may touch the TPM takes.
type tpmFlags struct {
	config string
	tpm    string
}

func (f *tpmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.config, "config", defaultConfigPath, "configuration `FILE`")
	fs.StringVar(&f.tpm, "tpm", "", "TPM `DEV`: /dev/tpmrm0, /dev/tpm0, swtpm:HOST:PORT or swtpm:/path/to/socket (default: the config's [tpm] device)")
}

// loadConfig reads the configuration. When optional, a missing file at the default path
// yields nil: the factory commands work before a configuration is installed.
func (f *tpmFlags) loadConfig(fs *flag.FlagSet, optional bool) (*config.Config, error) {
	cfg, err := config.Load(f.config)
	if optional && errors.Is(err, config.ErrNotExist) && !flagSet(fs, "config") {
		return nil, nil
	}
	if err != nil {
		return nil, configErrorf("%w", err)
	}
	return cfg, nil
}

// device is the TPM to use: --tpm, else the configuration's, else the default.
func (f *tpmFlags) device(cfg *config.Config) string {
	switch {
	case f.tpm != "":
		return f.tpm
	case cfg != nil && cfg.TPM.Device != "":
		return cfg.TPM.Device
	}
	return attest.DefaultTPM
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func requireFlags(fs *flag.FlagSet, names ...string) error {
	for _, n := range names {
		if fs.Lookup(n).Value.String() == "" {
			return usageErrorf("%s: --%s is required", fs.Name(), n)
		}
	}
	return nil
}

// opener opens the TPM the flags and the configuration name, when a key or a chain needs it.
func (f *tpmFlags) opener(ctx context.Context, cfg *config.Config) *attest.Opener {
	return attest.NewOpener(ctx, f.device(cfg))
}

// openTPM reads the configuration, if any (see loadConfig), and opens the TPM the flags and
// it name, for the factory commands that need the TPM itself. The caller closes the opener.
func (f *tpmFlags) openTPM(ctx context.Context, fs *flag.FlagSet) (*attest.Opener, *attest.TPM, *config.Config, error) {
	cfg, err := f.loadConfig(fs, true)
	if err != nil {
		return nil, nil, nil, err
	}
	opener := f.opener(ctx, cfg)
	tpm, err := opener.TPM()
	if err != nil {
		opener.Close()
		return nil, nil, nil, err
	}
	return opener, tpm, cfg, nil
}

// parse parses args, checks that the required flags are set, and reads the configuration
// (see loadConfig).
func (f *tpmFlags) parse(fs *flag.FlagSet, args []string, optional bool, required ...string) (*config.Config, error) {
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if err := requireFlags(fs, required...); err != nil {
		return nil, err
	}
	return f.loadConfig(fs, optional)
}

// identityFlags parses the flags of the commands that check the configured identity
// (--config, --tpm, --json) and reads the configuration.
func identityFlags(e *env, name string, args []string) (*tpmFlags, *jsonOutput, *config.Config, error) {
	fs := newFlagSet(e, name, "[--config FILE] [--tpm DEV] [--json]")
	tf := new(tpmFlags)
	tf.register(fs)
	out := e.jsonFlag(fs, "print one JSON object")
	cfg, err := tf.parse(fs, args, false)
	return tf, out, cfg, err
}

// keyFlags are the flags of the factory commands that use a device key, before a
// configuration may be installed: --key, --tpm and --config (for its [tpm] device).
type keyFlags struct {
	tpmFlags
	key string
	// cfg is the configuration parse read, nil when there is none.
	cfg *config.Config
}

func newKeyFlags(fs *flag.FlagSet) *keyFlags {
	f := &keyFlags{}
	f.register(fs)
	fs.StringVar(&f.key, "key", "", "device key: `KEYFILE`, tpmkey:handle=0x81......, or file:PATH")
	return f
}

// parse parses args, checks that --key and the other required flags are set, and returns the
// opener of the TPM, which opens it only if the key or a chain needs it.
func (f *keyFlags) parse(ctx context.Context, fs *flag.FlagSet, args []string, required ...string) (*attest.Opener, error) {
	cfg, err := f.tpmFlags.parse(fs, args, true, append([]string{"key"}, required...)...)
	if err != nil {
		return nil, err
	}
	f.cfg = cfg
	return f.opener(ctx, cfg), nil
}

// heldBy is err, naming the running agent when it holds a TPM that serves one program at a
// time (`factory install` on a live device), if the configuration says where its status is.
func (f *keyFlags) heldBy(tpm *attest.Opener, err error) error {
	if f.cfg == nil {
		return err
	}
	return heldBy(f.cfg, tpm.Spec(), err)
}

// loadKey loads a key spec or a bare keyfile path through tpm, warning about software keys.
func loadKey(e *env, tpm *attest.Opener, spec string) (*attest.Key, error) {
	key, err := tpm.LoadKey(spec)
	if err != nil {
		return nil, err
	}
	if key.Software {
		fmt.Fprintf(e.stderr, "unicity: warning: %s is a software key for development only: its private key is readable on disk\n", spec)
	}
	return key, nil
}

func runFactoryKeygen(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "factory keygen", "--out KEYFILE [--alg ecdsa-p256|rsa-2048] [--handle 0x81......] [--tpm DEV]")
	var tf tpmFlags
	tf.register(fs)
	out := fs.String("out", "", "write the TSS2 keyfile to `KEYFILE` (refuses to replace one)")
	alg := fs.String("alg", string(attest.ECDSAP256), "key `ALGORITHM`: ecdsa-p256 (recommended) or rsa-2048")
	handle := fs.String("handle", "", "also make the key persistent at TPM `HANDLE` 0x81000000-0x81FFFFFF (refuses an occupied one)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := requireFlags(fs, "out"); err != nil {
		return err
	}
	a, err := attest.ParseKeyAlgorithm(*alg)
	if err != nil {
		return usageErrorf("factory keygen: %v", err)
	}
	var persistAt tpm2.TPMHandle
	if *handle != "" {
		if persistAt, err = attest.ParsePersistentHandle(*handle); err != nil {
			return err
		}
	}
	// Refuse before the TPM spends time on a key that could not be saved.
	if _, err := os.Stat(*out); err == nil {
		return fmt.Errorf("%w: %s (remove it deliberately if its certificate is revoked)", attest.ErrKeyExists, *out)
	}
	opener, tpm, _, err := tf.openTPM(ctx, fs)
	if err != nil {
		return err
	}
	defer opener.Close()
	k, err := attest.CreateKey(tpm, a)
	if err != nil {
		return err
	}
	if err := attest.WriteKeyfile(*out, k); err != nil {
		return err
	}
	if persistAt != 0 {
		if err := attest.Persist(tpm, k, persistAt); err != nil {
			os.Remove(*out) // ours, written a moment ago: leave no key behind that nothing holds
			return err
		}
	}
	pub, err := k.PublicKey()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "created %s key %s (public key SHA-256 %s)\n", a, *out, attest.PublicKeySHA256(pub))
	if persistAt != 0 {
		fmt.Fprintf(e.stdout, "persisted at TPM handle %#x: use identity_key = \"tpmkey:handle=%#x\"\n", uint32(persistAt), uint32(persistAt))
	}
	return nil
}

func runFactoryCSR(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "factory csr", "--key KEYFILE --cn REGID --out CSR.pem [--tpm DEV]")
	kf := newKeyFlags(fs)
	cn := fs.String("cn", "", "registration ID for the certificate's CN (`REGID`)")
	out := fs.String("out", "", "write the PEM CSR to `FILE`")
	tpm, err := kf.parse(ctx, fs, args, "cn", "out")
	if err != nil {
		return err
	}
	defer tpm.Close()
	if err := attest.ValidRegistrationID(*cn); err != nil {
		return fmt.Errorf("--cn: %w", err)
	}
	key, err := loadKey(e, tpm, kf.key)
	if err != nil {
		return err
	}
	defer key.Close()
	der, err := attest.CreateCSR(key, *cn)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0o644); err != nil {
		return configErrorf("cannot write the CSR: %w", err)
	}
	fmt.Fprintf(e.stdout, "wrote CSR for %s to %s\n", *cn, *out)
	return nil
}

func runFactoryInstall(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "factory install", "--key KEYFILE --cert CERT.pem [--chain CHAIN.pem] --out IDENTITY.pem [--tpm DEV]")
	kf := newKeyFlags(fs)
	certPath := fs.String("cert", "", "the device certificate, PEM (`FILE`)")
	chainPath := fs.String("chain", "", "intermediate CA certificates, PEM, nearest first (`FILE`)")
	out := fs.String("out", "", "write the identity chain, leaf first, to `FILE` (PEM) or tpm-nv:0x01......")
	tpm, err := kf.parse(ctx, fs, args, "cert", "out")
	if err != nil {
		return err
	}
	defer tpm.Close()
	chain, err := attest.LoadChain(nil, *certPath)
	if err != nil {
		return err
	}
	if *chainPath != "" {
		more, err := attest.LoadChain(nil, *chainPath)
		if err != nil {
			return err
		}
		chain = append(chain, more...)
	}
	key, err := loadKey(e, tpm, kf.key)
	if err != nil {
		return kf.heldBy(tpm, err)
	}
	defer key.Close()
	id, err := attest.NewIdentity(chain, key, now())
	if err != nil {
		return err
	}
	if err := attest.ProveKey(key, id.Chain[0]); err != nil {
		return err
	}
	if nv, ok := strings.CutPrefix(*out, "tpm-nv:"); ok {
		idx, err := attest.ParseNVIndex(nv)
		if err != nil {
			return err
		}
		t, err := tpm.TPM()
		if err != nil {
			return err
		}
		if err := attest.WriteChainNV(t, idx, id.Chain); err != nil {
			return configErrorf("cannot install the identity: %w", err)
		}
	} else if err := certcodec.WriteCertificates(*out, id.Chain...); err != nil {
		return configErrorf("cannot install the identity: %w", err)
	}
	return json.NewEncoder(e.stdout).Encode(attest.NewManifest(id.Chain[0]))
}

// verifyResult is `factory verify --json`.
type verifyResult struct {
	OK               bool      `json:"ok"`
	RegistrationID   string    `json:"registration_id"`
	Key              string    `json:"key"`
	SoftwareKey      bool      `json:"software_key"`
	SHA256Thumbprint string    `json:"sha256_thumbprint"`
	NotAfter         time.Time `json:"not_after"`
}

func runFactoryVerify(ctx context.Context, e *env, args []string) error {
	tf, out, cfg, err := identityFlags(e, "factory verify", args)
	if err != nil {
		return err
	}
	if cfg.Attestation.Method != "x509" {
		return configErrorf("factory verify checks an X.509 identity; %s configures %s attestation (see `unicity identity` and `unicity check`)", cfg.Path, cfg.Attestation.Method)
	}
	tpm := tf.opener(ctx, cfg)
	defer tpm.Close()
	chain, err := tpm.LoadChain(cfg.Attestation.IdentityCert)
	if err != nil {
		return err
	}
	key, err := loadKey(e, tpm, cfg.Attestation.IdentityKey)
	if err != nil {
		return err
	}
	defer key.Close()
	id, err := attest.NewIdentity(chain, key, now())
	if err != nil {
		return err
	}
	if err := attest.ProveKey(key, id.Chain[0]); err != nil {
		return err
	}
	r := verifyResult{
		OK:               true,
		RegistrationID:   id.RegistrationID,
		Key:              key.Location,
		SoftwareKey:      key.Software,
		SHA256Thumbprint: certcodec.Thumbprint(id.Chain[0]),
		NotAfter:         id.Chain[0].NotAfter.UTC(),
	}
	if out.on {
		return out.print(r)
	}
	_, err = fmt.Fprintf(e.stdout, "OK: %s signs with %s, matches its certificate (SHA-256 %s), valid until %s\n",
		r.RegistrationID, r.Key, r.SHA256Thumbprint, r.NotAfter.Format(time.RFC3339))
	return err
}

// ekManifest is the manifest line of `factory ek`: what a TPM individual enrollment takes.
type ekManifest struct {
	RegistrationID string `json:"registration_id"`
	// EndorsementKey is the base64 of the EK's marshalled TPM2B_PUBLIC, as the Azure portal
	// and `az iot dps enrollment create --attestation-type tpm --endorsement-key` take it.
	EndorsementKey       string `json:"endorsement_key"`
	EndorsementKeySHA256 string `json:"endorsement_key_sha256"`
	// EKCertificate says the TPM maker's certificate for the key is in NV.
	EKCertificate bool `json:"ek_certificate"`
}

func runFactoryEK(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "factory ek", "[--tpm DEV] [--config FILE] [--out FILE] [--json]")
	var tf tpmFlags
	tf.register(fs)
	out := fs.String("out", "", "also write the endorsement key, base64, to `FILE` (for `unicity-emulator enroll --tpm-ek`)")
	js := e.jsonFlag(fs, "print the manifest line only")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	opener, tpm, cfg, err := tf.openTPM(ctx, fs)
	if err != nil {
		return err
	}
	defer opener.Close()
	ek, err := attest.ReadEndorsementKey(ctx, tpm)
	if err != nil {
		return err
	}
	sum := ek.PublicSHA256()
	m := ekManifest{
		RegistrationID:       ek.RegistrationID(),
		EndorsementKey:       base64.StdEncoding.EncodeToString(ek.Public),
		EndorsementKeySHA256: hex.EncodeToString(sum[:]),
		EKCertificate:        ek.Certificate != nil,
	}
	if cfg != nil && cfg.Provisioning.RegistrationID != "" {
		m.RegistrationID = cfg.Provisioning.RegistrationID
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(m.EndorsementKey+"\n"), 0o644); err != nil {
			return fmt.Errorf("cannot write the endorsement key: %w", err)
		}
	}
	if js.on {
		return js.print(m)
	}
	fmt.Fprintf(e.stdout, "Registration ID:    %s\n", m.RegistrationID)
	fmt.Fprintf(e.stdout, "EK public SHA-256:  %s\n", m.EndorsementKeySHA256)
	fmt.Fprintf(e.stdout, "Endorsement key:    %s\n", m.EndorsementKey)
	return json.NewEncoder(e.stdout).Encode(m)
}
