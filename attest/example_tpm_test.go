//go:build cgo

package attest_test

import (
	"crypto/x509"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/internal/pki"
)

// The factory flow and what the agent makes of it: a key created inside the TPM, a CSR it
// signs, a certificate from the OEM's CA, and the identity dps and hub authenticate with.
// On a device the TPM is attest.OpenTPM(ctx, attest.DefaultTPM); here it is the simulator.
func Example() {
	sim, err := simulator.Get()
	if err != nil {
		log.Fatal(err)
	}
	tpm := attest.Locked(transport.FromReadWriteCloser(sim))
	defer tpm.Close()

	// unicity factory keygen: the private key never leaves the TPM; the keyfile holds it
	// wrapped by the TPM's storage key.
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	if err != nil {
		log.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "attest-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "identity.key")
	if err := attest.WriteKeyfile(path, kf); err != nil {
		log.Fatal(err)
	}
	key, err := attest.LoadKey(tpm, "tpmkey:"+path)
	if err != nil {
		log.Fatal(err)
	}
	defer key.Close()

	// unicity factory csr, signed by the OEM's CA.
	der, err := attest.CreateCSR(key, "gw-0001")
	if err != nil {
		log.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		log.Fatal(err)
	}
	ca, err := pki.NewRoot("OEM factory CA")
	if err != nil {
		log.Fatal(err)
	}
	leaf, err := ca.SignCSR(csr)
	if err != nil {
		log.Fatal(err)
	}

	// The agent, at every boot: the chain and the TPM key form one checked identity.
	id, err := attest.NewIdentity(leaf.Chain, key, time.Now())
	if err != nil {
		log.Fatal(err)
	}
	cert := id.TLSCertificate()
	fmt.Println("registration ID:", id.RegistrationID)
	fmt.Println("signature schemes:", cert.SupportedSignatureAlgorithms)
	// Output:
	// registration ID: gw-0001
	// signature schemes: [ECDSAWithP256AndSHA256]
}
