package dial

import (
	"crypto/x509"
	"embed"
	"errors"
	"io/fs"
)

// The roots Azure IoT Hub and DPS chain to (protocol.md §6): DigiCert Global Root G2 and G3,
// Microsoft RSA and ECC Root Certificate Authority 2017. Built in so that a device with an
// old or absent system store still verifies the service. Copied from Debian's ca-certificates.
//
//go:embed roots/*.pem
var rootFiles embed.FS

// AzureRoots returns a new pool holding Azure's roots.
func AzureRoots() *x509.CertPool {
	pool := x509.NewCertPool()
	files, _ := fs.Glob(rootFiles, "roots/*.pem")
	for _, name := range files {
		data, _ := rootFiles.ReadFile(name)
		if !pool.AppendCertsFromPEM(data) {
			panic("dial: built-in root " + name + " does not parse") // TestAzureRoots checks them
		}
	}
	return pool
}

// RootPool returns Azure's roots plus the certificates of an extra PEM bundle (the emulator's,
// or a private cloud's).
func RootPool(extraPEM []byte) (*x509.CertPool, error) {
	pool := AzureRoots()
	if len(extraPEM) > 0 && !pool.AppendCertsFromPEM(extraPEM) {
		return nil, errors.New("trust bundle holds no PEM certificate")
	}
	return pool, nil
}
