package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/BurntSushi/toml"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/spool"
	"github.com/unicity-iot/unicity/telemetry"
)

// ErrNotExist reports that the configuration file is missing, as distinct from present
// but invalid: an installer can tell "not configured yet" from "configured wrongly".
var ErrNotExist = errors.New("configuration file does not exist")

// MaxSize bounds the configuration file. The commented example is 3 KiB; a file
// thousands of times larger is a mistake, and decoding it would take gigabytes.
const MaxSize = 1 << 20

// Error is a configuration problem located as precisely as the file allows: the file,
// the line (0 when unknown) and the dotted key (empty when the file as a whole is at fault).
type Error struct {
	File string
	Line int
	Key  string
	Err  error
}

// Error names the file, line and key, and says what is wrong, quoting at most an excerpt of
// a huge key or value (see bounded).
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Key != "" {
		fmt.Fprintf(&b, ": %s", bounded(e.Key))
	}
	fmt.Fprintf(&b, ": %s", bounded(fmt.Sprint(e.Err)))
	return b.String()
}

// Bounds of what a configuration error quotes of the file: a word (a key, a value, a path)
// longer than maxWord bytes is shown as an excerpt of wordExcerpt bytes, and the whole
// message as one of maxMessage.
const (
	maxWord     = 256
	wordExcerpt = 96
	maxMessage  = 1024
)

// bounded is msg with its overlong words, then itself if still too long, cut to excerpts.
func bounded(msg string) string {
	var b strings.Builder
	for len(msg) > 0 {
		end := strings.IndexAny(msg, " \t\n")
		if end < 0 {
			end = len(msg)
		}
		if w := msg[:end]; len(w) > maxWord {
			b.WriteString(excerpt(w, wordExcerpt))
		} else {
			b.WriteString(w)
		}
		if end < len(msg) {
			b.WriteByte(msg[end])
			end++
		}
		msg = msg[end:]
	}
	return excerpt(b.String(), maxMessage)
}

// excerpt is s cut to about n bytes, by leaving out its middle (on rune boundaries).
func excerpt(s string, n int) string {
	if len(s) <= n {
		return s
	}
	head, tail := n*2/3, len(s)-n/3
	for head > 0 && !utf8.RuneStart(s[head]) {
		head--
	}
	for tail < len(s) && !utf8.RuneStart(s[tail]) {
		tail++
	}
	return fmt.Sprintf("%s … (%d bytes left out) … %s", s[:head], tail-head, s[tail:])
}

func (e *Error) Unwrap() error { return e.Err }

// Config is the agent's configuration file (shared/design.md "Configuration"). Field names
// follow the TOML keys; defaults are those of Default.
type Config struct {
	Provisioning Provisioning `toml:"provisioning"`
	Attestation  Attestation  `toml:"attestation"`
	TPM          TPMConfig    `toml:"tpm"`
	Hub          HubConfig    `toml:"hub"`
	TLS          TLSConfig    `toml:"tls"`
	State        StateConfig  `toml:"state"`
	Runtime      Runtime      `toml:"runtime"`
	API          APIConfig    `toml:"api"`
	Agent        AgentConfig  `toml:"agent"`
	// Certificates is the [certificates] table: operational certificates issued by DPS.
	Certificates Certificates `toml:"certificates"`
	// Telemetry is the [telemetry] table: the on-disk queue of the applications' messages.
	// Its dir defaults to "telemetry" inside [state] dir.
	Telemetry telemetry.Options `toml:"telemetry"`

	// Path is the file the configuration was read from, for messages.
	Path string `toml:"-"`
}

// Provisioning is the [provisioning] table: where and how to reach DPS.
type Provisioning struct {
	GlobalEndpoint string `toml:"global_endpoint"`
	IDScope        string `toml:"id_scope"`
	RegistrationID string `toml:"registration_id"`
	Transport      string `toml:"transport"`
	Payload        string `toml:"payload"`
	Proxy          string `toml:"proxy"`
}

// Attestation is the [attestation] table: what the device proves itself with.
type Attestation struct {
	Method       string `toml:"method"`
	IdentityCert string `toml:"identity_cert"`
	IdentityKey  string `toml:"identity_key"`
	SymmetricKey string `toml:"symmetric_key"`
	// SymmetricKeyGroup says the symmetric_key file holds an enrollment group's key: the
	// device's own key is derived from it and the registration ID.
	SymmetricKeyGroup bool `toml:"symmetric_key_group"`
	// SRKHandle is the persistent handle of the storage root key TPM attestation imports the
	// identity key under (method "tpm"): reused when it holds one, created there otherwise.
	SRKHandle string `toml:"srk_handle"`
}

// DefaultTPMIdentityKey is identity_key's default for method "tpm": the identity key DPS
// sends is persisted where the Azure SDKs persist it.
const DefaultTPMIdentityKey = "tpmkey:handle=0x81000100"

// DefaultSRKHandle is srk_handle's default, the TCG's and the Azure SDKs' SRK handle.
const DefaultSRKHandle = "0x81000001"

// TPMConfig is the [tpm] table.
type TPMConfig struct {
	Device string `toml:"device"`
}

// HubConfig is the [hub] table.
type HubConfig struct {
	ModelID string `toml:"model_id"`
}

// TLSConfig is the [tls] table.
type TLSConfig struct {
	TrustBundle string `toml:"trust_bundle"`
}

// StateConfig is the [state] table.
type StateConfig struct {
	Dir string `toml:"dir"`
}

// Network is how the agent reaches DPS and the hub alike: the transport and the proxy. Their
// keys are in [provisioning] (a file contract), but they hold for the hub session too.
type Network struct {
	Transport string // auto, mqtt, mqtt-ws or https (DPS only; the hub then takes the WebSocket)
	Proxy     string // an http:// or https:// proxy URL; empty: the environment's, if any
}

// Network is the network settings both the dps and the hub adapters read.
func (c *Config) Network() Network {
	return Network{Transport: c.Provisioning.Transport, Proxy: c.Provisioning.Proxy}
}

// Runtime is the [runtime] table: the directory for the live status and the API socket
// (systemd's RuntimeDirectory=).
type Runtime struct {
	Dir string `toml:"dir"`
}

// APIConfig is the [api] table: the local API socket in the runtime directory.
type APIConfig struct {
	// Group owns the socket (mode 0660) so that gateway applications in it may use the
	// agent; empty leaves the service's own group.
	Group string `toml:"group"`
}

// AgentConfig is the [agent] table: how patient the agent is with DPS and the hub.
type AgentConfig struct {
	// FirstBootDelay is the window of a random delay before the first registration, so that
	// a fleet powered on at once does not reach DPS at once. Zero registers at once.
	FirstBootDelay time.Duration `toml:"first_boot_delay"`
	// RetryMin and RetryMax bound the exponential backoff (with full jitter) between failed
	// attempts to reach DPS or the hub.
	RetryMin time.Duration `toml:"retry_min"`
	RetryMax time.Duration `toml:"retry_max"`
	// ParkedRetry is how long the agent waits after DPS refused it for good (no enrollment,
	// disabled, certificate rejected) before asking again.
	ParkedRetry time.Duration `toml:"parked_retry"`
	// ReprovisionInterval is the least time between two registrations the agent decides on
	// by itself (hub refused the identity, hub unreachable): a hub that keeps refusing must
	// not turn into a DPS hammer.
	ReprovisionInterval time.Duration `toml:"reprovision_interval"`
	// HubFailures is how many failed connections in a row to an unreachable hub send the
	// agent back to DPS (the assignment may have changed).
	HubFailures int `toml:"hub_failures"`
}

// Certificates is the [certificates] table. With Issuance "dps" the factory identity is only
// the onboarding credential: each DPS registration sends a CSR for a new TPM key of KeyType,
// and the hub is reached with the certificate DPS issues for it. The agent renews it at
// RenewAt of its lifetime, spread by ±RenewJitter of it so that a fleet issued the same day
// does not renew in the same minute.
type Certificates struct {
	Issuance    string              `toml:"issuance"`
	KeyType     attest.KeyAlgorithm `toml:"key_type"`
	RenewAt     float64             `toml:"renew_at"`
	RenewJitter float64             `toml:"renew_jitter"`
}

// Issued reports whether the hub is reached with an operational certificate DPS issues.
func (c Certificates) Issued() bool { return c.Issuance == "dps" }

// TelemetryDirName is [telemetry] dir's default inside [state] dir.
const TelemetryDirName = "telemetry"

// Default returns the configuration an empty file stands for.
func Default() Config {
	return Config{
		Provisioning: Provisioning{
			GlobalEndpoint: "global.azure-devices-provisioning.net",
			Transport:      "auto",
		},
		Attestation: Attestation{
			Method:       "x509",
			IdentityCert: "/var/lib/unicity/identity.pem",
			IdentityKey:  "tpmkey:/var/lib/unicity/identity.key",
			SRKHandle:    DefaultSRKHandle,
		},
		TPM:          TPMConfig{Device: "/dev/tpmrm0"},
		Certificates: Certificates{Issuance: "none", KeyType: attest.ECDSAP256, RenewAt: 0.8, RenewJitter: 0.05},
		State:        StateConfig{Dir: "/var/lib/unicity"},
		Runtime:      Runtime{Dir: "/run/unicity"},
		Telemetry: telemetry.Options{
			Dir:      filepath.Join("/var/lib/unicity", TelemetryDirName),
			MaxBytes: spool.DefaultMaxBytes,
			MaxAge:   spool.DefaultMaxAge,
			WhenFull: spool.RefuseNew,
		},
		Agent: AgentConfig{
			RetryMin:            time.Second,
			RetryMax:            5 * time.Minute,
			ParkedRetry:         time.Hour,
			ReprovisionInterval: 10 * time.Minute,
			HubFailures:         10,
		},
	}
}

// Load reads and checks the configuration at path. A missing file is ErrNotExist;
// any other problem is a *Error naming the file, and the line and key where known.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("cannot read %s: %w", path, ErrNotExist)
	}
	if err != nil {
		return nil, &Error{File: path, Err: err}
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, &Error{File: path, Err: err}
	}
	return Parse(path, data)
}

// Parse decodes and checks a configuration held in memory; name is used in errors.
func Parse(name string, data []byte) (*Config, error) {
	if len(data) > MaxSize {
		return nil, &Error{File: name, Err: fmt.Errorf("larger than %d MiB: not a unicity configuration", MaxSize>>20)}
	}
	cfg := Default()
	cfg.Path = name
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&cfg)
	if err != nil {
		return nil, decodeError(name, data, err)
	}
	if undecoded := md.Undecoded(); len(undecoded) > 0 {
		k := undecoded[0]
		return nil, &Error{File: name, Line: lineOf(data, k), Key: k.String(), Err: errors.New("unknown key")}
	}
	if !md.IsDefined("telemetry", "dir") {
		cfg.Telemetry.Dir = filepath.Join(cfg.State.Dir, TelemetryDirName)
	}
	// x509's default key file is no place for TPM attestation's imported key: DPS's key
	// goes where the Azure SDKs persist it, unless the file names one.
	if cfg.Attestation.Method == "tpm" && !md.IsDefined("attestation", "identity_key") {
		cfg.Attestation.IdentityKey = DefaultTPMIdentityKey
	}
	if err := cfg.validate(); err != nil {
		var ce *Error
		if errors.As(err, &ce) {
			ce.File = name
			ce.Line = lineOf(data, strings.Split(ce.Key, "."))
		}
		return nil, err
	}
	return &cfg, nil
}

func decodeError(name string, data []byte, err error) error {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		ce := &Error{File: name, Line: pe.Position.Line, Key: pe.LastKey, Err: errors.New(pe.Message)}
		if ce.Line == 0 && pe.LastKey != "" {
			ce.Line = lineOf(data, strings.Split(pe.LastKey, "."))
		}
		return ce
	}
	// Type mismatches come as plain errors whose text carries the line and key.
	if m := typeErrorRE.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &Error{File: name, Line: line, Key: m[2], Err: errors.New(m[3])}
	}
	return &Error{File: name, Err: err}
}

var typeErrorRE = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// lineOf finds the line that sets key (a table and its key, or a table header) in a TOML
// document, for keys the decoder reports without a position. It returns 0 when unsure.
func lineOf(data []byte, key toml.Key) int {
	if len(key) == 0 {
		return 0
	}
	table, name := strings.Join(key[:len(key)-1], "."), key[len(key)-1]
	current := ""
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[") {
			header, _, _ := strings.Cut(strings.TrimLeft(line, "["), "]")
			current = strings.TrimSpace(header)
			if current == key.String() {
				return i + 1
			}
			continue
		}
		if current != table {
			continue
		}
		if k, _, ok := strings.Cut(line, "="); ok && strings.Trim(strings.TrimSpace(k), `"'`) == name {
			return i + 1
		}
	}
	return 0
}

var (
	// An Azure ID scope: "0ne" and eight hex digits, as the portal shows it.
	idScopeRE = regexp.MustCompile(`^0[nN][eE][0-9A-Fa-f]{8}$`)
)

func invalid(key, format string, a ...any) error {
	return &Error{Key: key, Err: fmt.Errorf(format, a...)}
}

func (c *Config) validate() error {
	p := c.Provisioning
	if err := validateEndpoint(p.GlobalEndpoint); err != nil {
		return invalid("provisioning.global_endpoint", "%v", err)
	}
	if p.IDScope == "" {
		return invalid("provisioning.id_scope", "missing: set the ID scope of the DPS instance (like 0ne00000000)")
	}
	if !idScopeRE.MatchString(p.IDScope) {
		return invalid("provisioning.id_scope", "%q is not an ID scope (\"0ne\" and 8 hex digits, like 0ne00000000)", p.IDScope)
	}
	if p.RegistrationID != "" {
		if err := attest.ValidRegistrationID(p.RegistrationID); err != nil {
			return invalid("provisioning.registration_id", "%v", err)
		}
	}
	switch p.Transport {
	case "auto", "mqtt", "mqtt-ws", "https":
	default:
		return invalid("provisioning.transport", "%q is not one of auto, mqtt, mqtt-ws, https", p.Transport)
	}
	if p.Payload != "" && !json.Valid([]byte(p.Payload)) {
		return invalid("provisioning.payload", "not valid JSON")
	}
	if p.Proxy != "" {
		u, err := url.Parse(p.Proxy)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return invalid("provisioning.proxy", "%q is not an http:// or https:// proxy URL", p.Proxy)
		}
	}

	a := c.Attestation
	switch a.Method {
	case "x509":
		if a.IdentityCert == "" {
			return invalid("attestation.identity_cert", "missing: x509 attestation needs the identity certificate")
		}
		if err := validateCertSource(a.IdentityCert); err != nil {
			return invalid("attestation.identity_cert", "%v", err)
		}
		if err := validateKeySource(a.IdentityKey); err != nil {
			return invalid("attestation.identity_key", "%v", err)
		}
	case "symmetric_key":
		if a.SymmetricKey == "" {
			return invalid("attestation.symmetric_key", "missing: symmetric_key attestation needs the key file")
		}
		if p.RegistrationID == "" {
			return invalid("provisioning.registration_id", "missing: symmetric_key attestation has no certificate to take it from")
		}
	case "tpm":
		// DPS serves TPM attestation over HTTPS (and AMQP), never over MQTT.
		if p.Transport != "auto" && p.Transport != "https" {
			return invalid("provisioning.transport", "%q cannot carry TPM attestation: DPS serves it over HTTPS only (auto or https)", p.Transport)
		}
		if err := validateTPMIdentityKey(a.IdentityKey); err != nil {
			return invalid("attestation.identity_key", "%v", err)
		}
	default:
		return invalid("attestation.method", "%q is not one of x509, symmetric_key, tpm", a.Method)
	}
	if _, err := attest.ParsePersistentHandle(a.SRKHandle); err != nil {
		return invalid("attestation.srk_handle", "%q is not a persistent handle (0x81000000 to 0x81FFFFFF)", a.SRKHandle)
	}
	if a.SymmetricKeyGroup && a.Method != "symmetric_key" {
		return invalid("attestation.symmetric_key_group", "only with method = \"symmetric_key\"")
	}

	if err := validateTPMDevice(c.TPM.Device); err != nil {
		return invalid("tpm.device", "%v", err)
	}
	if c.State.Dir == "" {
		return invalid("state.dir", "must not be empty")
	}
	if c.Runtime.Dir == "" {
		return invalid("runtime.dir", "must not be empty")
	}

	pol := c.Agent
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"agent.first_boot_delay", pol.FirstBootDelay},
		{"agent.retry_min", pol.RetryMin},
		{"agent.retry_max", pol.RetryMax},
		{"agent.parked_retry", pol.ParkedRetry},
		{"agent.reprovision_interval", pol.ReprovisionInterval},
	} {
		if d.v < 0 {
			return invalid(d.key, "must not be negative")
		}
	}
	if pol.RetryMin <= 0 {
		return invalid("agent.retry_min", "must be positive")
	}
	if pol.RetryMax < pol.RetryMin {
		return invalid("agent.retry_max", "must not be less than agent.retry_min (%s)", pol.RetryMin)
	}
	if pol.ParkedRetry < pol.RetryMin {
		return invalid("agent.parked_retry", "must not be less than agent.retry_min (%s)", pol.RetryMin)
	}
	if pol.HubFailures < 1 {
		return invalid("agent.hub_failures", "must be at least 1")
	}
	if err := c.validateCertificates(); err != nil {
		return err
	}
	return c.validateTelemetry()
}

func (c *Config) validateCertificates() error {
	cc := c.Certificates
	switch cc.Issuance {
	case "none":
	case "dps":
		if c.Attestation.Method != "x509" {
			return invalid("certificates.issuance", "\"dps\" needs attestation method = \"x509\": the operational key lives in the TPM")
		}
	default:
		return invalid("certificates.issuance", "%q is not one of none, dps", cc.Issuance)
	}
	switch cc.KeyType {
	case attest.ECDSAP256, attest.ECDSAP384:
	default:
		return invalid("certificates.key_type", "%q is not one of %s, %s", cc.KeyType, attest.ECDSAP256, attest.ECDSAP384)
	}
	if cc.RenewJitter < 0 || cc.RenewAt-cc.RenewJitter <= 0 || cc.RenewAt+cc.RenewJitter >= 1 {
		return invalid("certificates.renew_at", "renew_at ± renew_jitter (%g ± %g) must stay inside (0, 1): shares of the certificate's lifetime", cc.RenewAt, cc.RenewJitter)
	}
	return nil
}

func (c *Config) validateTelemetry() error {
	t := c.Telemetry
	if t.Dir == "" {
		return invalid("telemetry.dir", "must not be empty")
	}
	// The runtime directory is a tmpfs under systemd: a queue there is lost at every boot.
	if within(t.Dir, c.Runtime.Dir) {
		return invalid("telemetry.dir", "%s is inside runtime.dir (%s), which does not survive a reboot: keep it inside state.dir", t.Dir, c.Runtime.Dir)
	}
	if t.MaxBytes < spool.MinMaxBytes {
		return invalid("telemetry.max_bytes", "must be at least %d (64 KiB)", spool.MinMaxBytes)
	}
	if t.MaxAge <= 0 {
		return invalid("telemetry.max_age", "must be positive")
	}
	return nil
}

// within reports whether path is dir or inside it, lexically.
func within(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func validateEndpoint(ep string) error {
	if ep == "" {
		return errors.New("must not be empty")
	}
	if strings.Contains(ep, "://") || strings.ContainsAny(ep, "/ ") {
		return fmt.Errorf("%q is not a host or host:port", ep)
	}
	host := ep
	if h, port, err := net.SplitHostPort(ep); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("%q: bad port", ep)
		}
		host = h
	}
	if host == "" {
		return fmt.Errorf("%q has no host", ep)
	}
	return nil
}

func validateCertSource(s string) error {
	if h, ok := strings.CutPrefix(s, "tpm-nv:"); ok {
		_, err := attest.ParseNVIndex(h)
		return err
	}
	return nil
}

// validateTPMIdentityKey checks where TPM attestation keeps the key DPS sends: a persistent
// handle, or a keyfile the TPM's SRK loads (no software key: it never leaves the TPM).
func validateTPMIdentityKey(s string) error {
	rest, ok := strings.CutPrefix(s, "tpmkey:")
	if !ok || rest == "" {
		return fmt.Errorf("%q is not tpmkey:handle=0x81...... or tpmkey:PATH: TPM attestation keeps its key in the TPM", s)
	}
	if h, ok := strings.CutPrefix(rest, "handle="); ok {
		_, err := attest.ParsePersistentHandle(h)
		return err
	}
	if !filepath.IsAbs(rest) {
		return fmt.Errorf("%q: the keyfile's path must be absolute", s)
	}
	return nil
}

func validateKeySource(s string) error {
	kind, rest, ok := strings.Cut(s, ":")
	if !ok || rest == "" {
		return fmt.Errorf("%q is not tpmkey:PATH, tpmkey:handle=0x81......, or file:PATH", s)
	}
	switch kind {
	case "tpmkey":
		if h, ok := strings.CutPrefix(rest, "handle="); ok {
			_, err := attest.ParsePersistentHandle(h)
			return err
		}
		return nil
	case "file":
		return nil
	default:
		return fmt.Errorf("%q: unknown key source %q (want tpmkey: or file:)", s, kind)
	}
}

func validateTPMDevice(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	if rest, ok := strings.CutPrefix(s, "swtpm:"); ok && rest == "" {
		return fmt.Errorf("%q: swtpm: needs HOST:PORT or a socket path", s)
	}
	return nil
}
