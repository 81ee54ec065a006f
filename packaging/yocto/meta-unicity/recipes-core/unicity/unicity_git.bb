SUMMARY = "TPM-backed Azure IoT device agent"
DESCRIPTION = "unicity gives the gateway an X.509 identity whose key never leaves its TPM 2.0, \
registers it with the Azure Device Provisioning Service over MQTT/TLS and keeps it connected \
to the assigned IoT Hub."
HOMEPAGE = "https://github.com/unicity-iot/unicity"
SECTION = "network"
# The repository carries no license file yet. Set LICENSE and LIC_FILES_CHKSUM to it when it
# does; until then the recipe is for images built by the rights holder.
LICENSE = "CLOSED"

SRC_URI = "git://github.com/unicity-iot/unicity.git;protocol=https;branch=main;destsuffix=${GO_SRCURI_DESTSUFFIX}"
# Products pin the commit they ship (SRCREV = "<40 hex digits>" in a bbappend or local.conf).
SRCREV ?= "${AUTOREV}"
PV = "0.0+git"

GO_IMPORT = "github.com/unicity-iot/unicity"
GO_INSTALL = "${GO_IMPORT}/cmd/unicity"
UNICITY_SRC = "${S}/src/${GO_IMPORT}"

inherit go-mod systemd useradd features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# The agent links no C code: built as by `make cross`. The version variables are the Makefile's
# LDFLAGS; stripping (its -s -w) is left to the build system, which keeps the symbols in
# ${PN}-dbg. CommitUnix is the agent's lower bound for a sane clock.
export CGO_ENABLED = "0"
GO_EXTRA_LDFLAGS:append = " \
    -X ${GO_IMPORT}/internal/version.Version=${PV} \
    -X ${GO_IMPORT}/internal/version.Commit=${@d.getVar('SRCREV')[:12]} \
    -X ${GO_IMPORT}/internal/version.CommitUnix=${SOURCE_DATE_EPOCH} \
"

# Go links a position-independent executable without cgo only on some targets (go.bbclass
# asks for one everywhere): elsewhere the agent is a plain static executable.
python () {
    if d.getVar('TARGET_GOARCH') not in ('amd64', 'arm64', 'ppc64le', 's390x', 'loong64'):
        d.setVar('GOBUILDFLAGS:remove', '-buildmode=pie')
}

# Modules come through GOPROXY at compile time. Offline builds: docs/oem.md.
do_compile[network] = "1"

do_install:append() {
    # go.bbclass also installs the Go sources for a -dev package; a gateway needs the agent only.
    rm -rf ${D}${libdir}/go

    install -D -m 0644 ${UNICITY_SRC}/packaging/systemd/unicity.service \
        ${D}${systemd_system_unitdir}/unicity.service
    sed -i 's|^ExecStart=/usr/bin/|ExecStart=${bindir}/|' ${D}${systemd_system_unitdir}/unicity.service
    install -D -m 0644 ${UNICITY_SRC}/packaging/systemd/unicity.sysusers \
        ${D}${nonarch_libdir}/sysusers.d/unicity.conf
    install -D -m 0644 ${UNICITY_SRC}/packaging/systemd/unicity.tmpfiles \
        ${D}${nonarch_libdir}/tmpfiles.d/unicity.conf
    install -D -m 0644 ${UNICITY_SRC}/packaging/config.toml ${D}${sysconfdir}/unicity/config.toml
    install -d -m 0700 -o unicity -g unicity ${D}${localstatedir}/lib/unicity
}

SYSTEMD_SERVICE:${PN} = "unicity.service"
SYSTEMD_AUTO_ENABLE = "enable"

# The service user, in tss: the group that may open /dev/tpmrm0 (its udev rule comes with
# tpm2-tss or tpm-udev; see docs/oem.md). groupadd skips a tss group that already exists.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system tss"
USERADD_PARAM:${PN} = "--system --user-group --groups tss --home-dir ${localstatedir}/lib/unicity \
    --no-create-home --shell ${base_sbindir}/nologin --comment 'unicity device agent' unicity"

FILES:${PN} += " \
    ${systemd_system_unitdir}/unicity.service \
    ${nonarch_libdir}/sysusers.d/unicity.conf \
    ${nonarch_libdir}/tmpfiles.d/unicity.conf \
    ${sysconfdir}/unicity \
    ${localstatedir}/lib/unicity \
"
CONFFILES:${PN} = "${sysconfdir}/unicity/config.toml"
