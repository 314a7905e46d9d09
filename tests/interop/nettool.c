/*
 * nettool: the guest side of esptun's kernel-interop suite (tests/interop.rs).
 * Built statically by tests/interop/build-guest.sh and put in the guest's
 * initramfs. Every mode is bounded by a timeout; results go to stdout as
 * `key=value` words the test parses. Addresses (DST) are IPv4 or IPv6;
 * listeners are dual-stack IPv6 sockets, so they serve both families.
 *
 *   nettool natt-socket PORT [6]
 *       Holds a UDP socket on PORT with UDP_ENCAP_ESPINUDP and a per-socket
 *       bypass policy in both directions, as IKE daemons do, so that the
 *       kernel decapsulates ESP-in-UDP (RFC 3948) arriving on PORT. With
 *       `6`, an IPv6-only socket (AF_INET6; Linux 5.8 and later), which can
 *       sit next to the IPv4 one on the same port. Runs until killed.
 *   nettool udp-echo PORT COUNT TIMEOUT_MS
 *       Echoes up to COUNT datagrams back to their sender.
 *   nettool udp-recv PORT TIMEOUT_MS
 *       Waits for one datagram: prints its length and payload in hex.
 *   nettool udp-send DST PORT COUNT SIZE
 *       Sends COUNT datagrams of SIZE bytes (first 4 bytes: index).
 *   nettool send-hex DST PORT SRCPORT HEX
 *       Sends one datagram with the given bytes from SRCPORT, with a bypass
 *       policy (so the bytes go on the wire as they are, not through xfrm).
 *   nettool tcp-sink PORT TIMEOUT_MS
 *       Accepts one connection; counts bytes and non-zero bytes until EOF.
 *   nettool tcp-zeros DST PORT BYTES TIMEOUT_MS
 *       Connects and sends BYTES zeros, then waits for the peer to close.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdnoreturn.h>
#include <linux/ipsec.h>
#include <linux/udp.h>
#include <linux/xfrm.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_ENCAP
#define UDP_ENCAP 100
#endif
#ifndef UDP_ENCAP_ESPINUDP
#define UDP_ENCAP_ESPINUDP 2
#endif

static void die(const char *what) {
    printf("error=%s errno=%d (%s)\n", what, errno, strerror(errno));
    fflush(stdout);
    exit(1);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until fd is readable or the deadline passes; 1 if readable. */
static int wait_readable(int fd, long long deadline) {
    for (int i = 0; i < 100000; i++) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            die("poll");
    }
    return 0;
}

static void bypass(int fd, int family) {
    struct xfrm_userpolicy_info pol;
    memset(&pol, 0, sizeof pol);
    pol.action = XFRM_POLICY_ALLOW;
    pol.sel.family = (unsigned short)family;
    pol.lft.soft_byte_limit = XFRM_INF;
    pol.lft.hard_byte_limit = XFRM_INF;
    pol.lft.soft_packet_limit = XFRM_INF;
    pol.lft.hard_packet_limit = XFRM_INF;
    int level = family == AF_INET6 ? IPPROTO_IPV6 : IPPROTO_IP;
    int opt = family == AF_INET6 ? IPV6_XFRM_POLICY : IP_XFRM_POLICY;
    pol.dir = XFRM_POLICY_IN;
    if (setsockopt(fd, level, opt, &pol, sizeof pol) < 0)
        die("XFRM_POLICY in");
    pol.dir = XFRM_POLICY_OUT;
    if (setsockopt(fd, level, opt, &pol, sizeof pol) < 0)
        die("XFRM_POLICY out");
}

/* A socket of `family` bound to PORT on the wildcard address. An AF_INET6
 * socket is dual-stack unless v6only. */
static int bound(int family, int type, int port, int v6only) {
    int fd = socket(family, type, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (family == AF_INET6) {
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only) < 0)
            die("IPV6_V6ONLY");
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind");
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind");
    }
    return fd;
}

/* Listeners: dual-stack, so IPv4 and IPv6 peers reach the same socket. */
static int udp_bound(int port) { return bound(AF_INET6, SOCK_DGRAM, port, 0); }

struct addr {
    struct sockaddr_storage ss;
    socklen_t len;
    int family;
};

static struct addr addr(const char *ip, int port) {
    struct addr a;
    memset(&a, 0, sizeof a);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&a.ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&a.ss;
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        a.len = sizeof *v4;
        a.family = AF_INET;
    } else if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        a.len = sizeof *v6;
        a.family = AF_INET6;
    } else {
        printf("error=bad address %s\n", ip);
        exit(2);
    }
    return a;
}

static noreturn void natt_socket(int port, int v6) {
    int family = v6 ? AF_INET6 : AF_INET;
    int fd = bound(family, SOCK_DGRAM, port, 1);
    bypass(fd, family);
    int encap = UDP_ENCAP_ESPINUDP;
    if (setsockopt(fd, IPPROTO_UDP, UDP_ENCAP, &encap, sizeof encap) < 0)
        die("UDP_ENCAP");
    printf("natt-socket port=%d family=%s ready\n", port, v6 ? "ipv6" : "ipv4");
    fflush(stdout);
    /* Nothing is read here: ESP is consumed by the kernel. */
    for (;;)
        pause();
}

static int udp_echo(int port, int count, int timeout_ms) {
    int fd = udp_bound(port);
    printf("listening port=%d\n", port);
    fflush(stdout);
    long long deadline = now_ms() + timeout_ms;
    int echoed = 0;
    static unsigned char buf[65536];
    while (echoed < count && wait_readable(fd, deadline)) {
        struct sockaddr_storage from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n < 0)
            die("recvfrom");
        if (sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, len) < 0)
            die("sendto");
        echoed++;
    }
    printf("echoed=%d\n", echoed);
    return 0;
}

static int udp_recv(int port, int timeout_ms) {
    int fd = udp_bound(port);
    printf("listening port=%d\n", port);
    fflush(stdout);
    static unsigned char buf[65536];
    if (!wait_readable(fd, now_ms() + timeout_ms)) {
        printf("received=0\n");
        return 0;
    }
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0)
        die("recv");
    printf("received=1 len=%zd payload=", n);
    for (ssize_t i = 0; i < n; i++)
        printf("%02x", buf[i]);
    printf("\n");
    return 0;
}

static int udp_send(const char *dst, int port, int count, int size) {
    struct addr a = addr(dst, port);
    int fd = socket(a.family, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    static unsigned char buf[65536];
    if (size < 4 || size > (int)sizeof buf) {
        printf("error=bad size\n");
        return 2;
    }
    int sent = 0;
    for (int i = 0; i < count; i++) {
        memset(buf, 0x5a, (size_t)size);
        uint32_t be = htonl((uint32_t)i);
        memcpy(buf, &be, 4);
        if (sendto(fd, buf, (size_t)size, 0, (struct sockaddr *)&a.ss, a.len) == size)
            sent++;
        usleep(2000);
    }
    printf("sent=%d\n", sent);
    return 0;
}

static int send_hex(const char *dst, int port, int srcport, const char *hex) {
    size_t n = strlen(hex) / 2;
    unsigned char *buf = malloc(n + 1);
    if (!buf)
        die("malloc");
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
            printf("error=bad hex\n");
            return 2;
        }
        buf[i] = (unsigned char)v;
    }
    struct addr a = addr(dst, port);
    int fd = bound(a.family, SOCK_DGRAM, srcport, 1);
    bypass(fd, a.family);
    ssize_t w = sendto(fd, buf, n, 0, (struct sockaddr *)&a.ss, a.len);
    if (w != (ssize_t)n)
        die("sendto");
    printf("sent=1 len=%zu\n", n);
    return 0;
}

static int tcp_sink(int port, int timeout_ms) {
    int lfd = bound(AF_INET6, SOCK_STREAM, port, 0);
    if (listen(lfd, 1) < 0)
        die("listen");
    printf("listening port=%d\n", port);
    fflush(stdout);
    long long deadline = now_ms() + timeout_ms;
    if (!wait_readable(lfd, deadline)) {
        printf("error=no connection bytes=0 nonzero=0\n");
        return 1;
    }
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    static unsigned char buf[65536];
    long long bytes = 0, nonzero = 0, first_nonzero = -1;
    int eof = 0;
    while (wait_readable(fd, deadline)) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0)
            die("read");
        if (n == 0) {
            eof = 1;
            break;
        }
        for (ssize_t i = 0; i < n; i++)
            if (buf[i]) {
                if (first_nonzero < 0)
                    first_nonzero = bytes + i;
                nonzero++;
            }
        bytes += n;
    }
    close(fd);
    printf("bytes=%lld nonzero=%lld first_nonzero=%lld eof=%d\n", bytes, nonzero, first_nonzero, eof);
    return 0;
}

static int tcp_zeros(const char *dst, int port, long long total, int timeout_ms) {
    struct addr a = addr(dst, port);
    long long deadline = now_ms() + timeout_ms;
    int fd = -1;
    /* The host's listener may be a moment late: retry refusals briefly. */
    for (int i = 0; i < 50; i++) {
        fd = socket(a.family, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        struct timeval tv = {.tv_sec = 5};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&a.ss, a.len) == 0)
            break;
        close(fd);
        fd = -1;
        if (now_ms() >= deadline)
            break;
        usleep(100000);
    }
    if (fd < 0)
        die("connect");
    static unsigned char buf[65536];
    memset(buf, 0, sizeof buf);
    long long sent = 0;
    while (sent < total && now_ms() < deadline) {
        size_t want = (size_t)(total - sent < (long long)sizeof buf ? total - sent : (long long)sizeof buf);
        ssize_t n = write(fd, buf, want);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("write");
        }
        sent += n;
    }
    shutdown(fd, SHUT_WR);
    /* Wait for the peer's close so that everything was received. */
    while (wait_readable(fd, deadline)) {
        if (read(fd, buf, sizeof buf) <= 0)
            break;
    }
    close(fd);
    printf("sent=%lld\n", sent);
    return sent == total ? 0 : 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "natt-socket"))
        natt_socket(atoi(argv[2]), argc >= 4 && !strcmp(argv[3], "6"));
    if (argc >= 5 && !strcmp(argv[1], "udp-echo"))
        return udp_echo(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc >= 4 && !strcmp(argv[1], "udp-recv"))
        return udp_recv(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 6 && !strcmp(argv[1], "udp-send"))
        return udp_send(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc >= 6 && !strcmp(argv[1], "send-hex"))
        return send_hex(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
    if (argc >= 4 && !strcmp(argv[1], "tcp-sink"))
        return tcp_sink(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 6 && !strcmp(argv[1], "tcp-zeros"))
        return tcp_zeros(argv[2], atoi(argv[3]), atoll(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: see the comment at the top of nettool.c\n");
    return 2;
}
